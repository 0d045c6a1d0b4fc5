"""Helpers for the vLLM connector tests: prompts, config files, a real vLLM in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_connector_vllm.demo import make_prompt, write_config  # noqa: F401  (re-exported for the tests)

RUNNER = Path(__file__).with_name("vllm_runner.py")
#: every vLLM start in these tests must finish within this many seconds
VLLM_TIMEOUT = 420


@dataclass
class VllmRun:
    """One finished vLLM process: its per-prompt outputs and its whole log."""

    outputs: list[dict[str, Any]]
    log: str


def run_vllm(
    job: dict[str, Any],
    workdir: Path,
    config_file: Path,
    name: str,
    extra_env: dict[str, str] | None = None,
) -> VllmRun:
    """Run ``vllm_runner.py`` with ``job``; fail with the log's tail if it fails."""
    job = dict(job, result_file=str(workdir / f"{name}.json"))
    job_file = workdir / f"{name}_job.json"
    job_file.write_text(json.dumps(job))
    log_file = workdir / f"{name}.log"
    env = dict(os.environ)
    env.update(
        LMCACHE_CONFIG_FILE=str(config_file),
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: plenty for these prompts
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    with log_file.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(job_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=VLLM_TIMEOUT,
            cwd=workdir,
        )
    text = log_file.read_text(errors="replace")
    assert proc.returncode == 0, f"vLLM run {name} failed ({proc.returncode}):\n{text[-6000:]}"
    outputs = json.loads(Path(job["result_file"]).read_text())["outputs"]
    return VllmRun(outputs, text)
