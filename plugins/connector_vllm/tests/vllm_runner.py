"""Runs one real vLLM instance (CPU) through a JSON job and writes JSON results.

Tests and the TTFT benchmark start this script in a fresh process, so each controls the
process's environment (``LMCACHE_CONFIG_FILE``) and vLLM's own child processes are cleaned up
with it. Usage: ``python vllm_runner.py JOB.json``. The job::

    {"model": "/tmp/x/model", "result_file": "/tmp/x/out.json",
     "connector": "module_path" | "plugin" | null,     # how to name our connector
     "load_failure_policy": "recompute" | "fail" | null,  # null: vLLM's default
     "enable_prefix_caching": false, "dtype": "float32",
     "steps": [{"prompt": [1, 2, ...], "max_tokens": 8},
               {"wait_for_file": "/tmp/x/go", "timeout": 60},  # let the test act in between
               {"touch": "/tmp/x/ready"}]}

Results: ``{"outputs": [{"token_ids": [...], "num_cached_tokens": n, "seconds": t}, ...]}``,
one per prompt step, ``seconds`` being the wall time of that ``generate`` call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# re-exported: conftest.py and benchmarks/bench_vllm_ttft.py take the model writer from here
from lmcache_connector_vllm.demo import MODULE_PATH_CONFIG, PLUGIN_CONFIG, write_tiny_llama  # noqa: F401


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)  # polling a file the test creates, with a deadline


def run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    connector = job.get("connector")
    if connector == "module_path":
        kwargs["kv_transfer_config"] = dict(MODULE_PATH_CONFIG)
    elif connector == "plugin":
        kwargs["kv_transfer_config"] = dict(PLUGIN_CONFIG)
    elif connector is not None:
        raise ValueError(f"unknown connector mode {connector!r}")
    policy = job.get("load_failure_policy", "recompute")
    if connector is not None and policy is None:  # vLLM's default
        del kwargs["kv_transfer_config"]["kv_load_failure_policy"]
    elif connector is not None:
        kwargs["kv_transfer_config"]["kv_load_failure_policy"] = policy
    llm = LLM(
        model=job["model"],
        load_format=job.get("load_format", "auto"),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 4096),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 8192),
        enable_prefix_caching=job.get("enable_prefix_caching", False),
        seed=0,
        **kwargs,
    )
    outputs = []
    for step in job["steps"]:
        if "wait_for_file" in step:
            _wait_for_file(step["wait_for_file"], step.get("timeout", 120))
            continue
        if "touch" in step:
            Path(step["touch"]).touch()
            continue
        params = SamplingParams(
            temperature=0, max_tokens=step.get("max_tokens", 8), ignore_eos=True
        )
        start = time.perf_counter()
        (out,) = llm.generate([{"prompt_token_ids": step["prompt"]}], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        outputs.append(
            {
                "token_ids": list(out.outputs[0].token_ids),
                "num_cached_tokens": out.num_cached_tokens or 0,
                "seconds": seconds,
            }
        )
        if "result_file" in job:  # so far: a test may kill this process after a step
            Path(job["result_file"]).write_text(json.dumps({"outputs": outputs}))
    return {"outputs": outputs}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run(job)
    Path(job["result_file"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
