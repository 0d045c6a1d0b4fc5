"""Helpers for the vLLM connector tests: prompts, config files, a real vLLM in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_connector_vllm.demo import make_prompt, stop_process, write_config  # noqa: F401  (re-exported for the tests)

RUNNER = Path(__file__).with_name("vllm_runner.py")
#: every vLLM start in these tests must finish within this many seconds
VLLM_TIMEOUT = 420


@dataclass
class VllmRun:
    """One finished vLLM process: its per-prompt outputs and its whole log."""

    outputs: list[dict[str, Any]]
    log: str


class VllmProcess:
    """A ``vllm_runner.py`` process started with ``job``; ``finish()`` waits for its results."""

    def __init__(
        self,
        job: dict[str, Any],
        workdir: Path,
        config_file: Path,
        name: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.job = dict(job, result_file=str(workdir / f"{name}.json"))
        job_file = workdir / f"{name}_job.json"
        job_file.write_text(json.dumps(self.job))
        self.log_file = workdir / f"{name}.log"
        env = dict(os.environ)
        env.update(
            LMCACHE_CONFIG_FILE=str(config_file),
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: plenty for these prompts
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})
        with self.log_file.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(RUNNER), str(job_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                start_new_session=True,
            )

    def finish(self, timeout: float = VLLM_TIMEOUT) -> VllmRun:
        """Wait for the run (stopping it after ``timeout``); fail with the log's tail if it failed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        code = stop_process(self.proc, signal.SIGKILL, timeout=10)
        text = self.log_file.read_text(errors="replace")
        assert code == 0, f"vLLM run {self.name} failed ({code}):\n{text[-6000:]}"
        outputs = json.loads(Path(self.job["result_file"]).read_text())["outputs"]
        return VllmRun(outputs, text)


def run_vllm(
    job: dict[str, Any],
    workdir: Path,
    config_file: Path,
    name: str,
    extra_env: dict[str, str] | None = None,
) -> VllmRun:
    """Run ``vllm_runner.py`` with ``job`` to its end; fail with the log's tail if it fails."""
    return VllmProcess(job, workdir, config_file, name, extra_env).finish()
