"""Two real vLLM instances started at once from one YAML file, sharing its ``local_disk``.

Both start (each writes its own area of the directory; the YAML also carries keys LMCache
knows and we ignore, with a warning), the first computes and stores a prompt, and the second,
asked the same prompt, loads it from the first's files on disk with the same output. Each instance sets its own ``lmcache_instance_id`` through
``LMCACHE_LMCACHE_INSTANCE_ID``, the YAML file is the same.
"""

from __future__ import annotations

from pathlib import Path

from lmcache_connector_vllm.demo import poll_until

from vllm_helpers import VllmProcess, make_prompt, write_config

START_TIMEOUT = 420.0


def test_two_instances_from_one_yaml_both_start_and_the_second_loads_the_firsts_prompt_from_disk(
    tmp_path: Path, tiny_model: Path
) -> None:
    disk = tmp_path / "disk"
    config = write_config(  # with keys LMCache knows and we do not use: a warning, not a failure
        tmp_path / "lmcache.yaml", chunk_size=256, local_cpu=True, max_local_cpu_size=0.25,
        local_disk=str(disk), max_local_disk_size=1.0, save_unfull_chunk=True, enable_pd=False,
        controller_reply_url="localhost:8300",
    )
    prompt = make_prompt(7, length=1000)
    first_done, go, second_done = tmp_path / "first_done", tmp_path / "go", tmp_path / "second_done"
    model = {"model": str(tiny_model), "connector": "plugin", "enable_prefix_caching": False}
    first = VllmProcess(
        {**model, "steps": [
            {"prompt": prompt, "max_tokens": 8},
            {"touch": str(first_done)},
            {"wait_for_file": str(second_done), "timeout": START_TIMEOUT},
        ]},
        tmp_path, config, "first", extra_env={"LMCACHE_LMCACHE_INSTANCE_ID": "first"},
    )
    second = VllmProcess(
        {**model, "steps": [
            {"wait_for_file": str(go), "timeout": START_TIMEOUT},
            {"prompt": prompt, "max_tokens": 8},
            {"touch": str(second_done)},
        ]},
        tmp_path, config, "second", extra_env={"LMCACHE_LMCACHE_INSTANCE_ID": "second"},
    )
    try:
        def first_state() -> bool:
            assert first.proc.poll() is None, first.log_file.read_text(errors="replace")[-4000:]
            assert second.proc.poll() is None, second.log_file.read_text(errors="replace")[-4000:]
            return first_done.exists()

        poll_until(first_state, bool, START_TIMEOUT, "the first instance serving its prompt")
        # its 4 chunks reach its own area of the shared directory (written behind)
        poll_until(
            lambda: len(list((disk / "first").glob("*.kvchunk"))), lambda n: n >= 4, 60,
            "the first instance's chunk files",
        )
        go.touch()
        second_run = second.finish()
        first_run = first.finish()
    finally:
        for run in (first, second):
            if run.proc.poll() is None:
                run.proc.kill()
    (computed,) = first_run.outputs
    (loaded,) = second_run.outputs
    assert computed["num_cached_tokens"] == 0
    assert loaded["num_cached_tokens"] == len(prompt) - 1
    assert loaded["token_ids"] == computed["token_ids"]
    assert f"loaded {len(prompt) - 1} tokens (0..{len(prompt) - 1}); chunks per location: {{'LocalDiskBackend': 4}}" in second_run.log
    assert sorted(p.name for p in disk.iterdir() if p.is_dir()) == ["first", "second"]
    for run in (first_run, second_run):
        warning = next(line for line in run.log.splitlines() if "ignoring config keys that LMCache knows" in line)
        for key in ("save_unfull_chunk", "enable_pd", "controller_reply_url"):
            assert key in warning
