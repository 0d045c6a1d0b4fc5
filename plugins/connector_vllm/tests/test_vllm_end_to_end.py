"""A real vLLM 0.32 on CPU with the connector: hits from CPU and disk, identical outputs,
recompute after a failed load, and both ways of naming the connector.

Two vLLM processes serve the whole module (starting vLLM dominates the runtime):

* instance A names the connector by module path, with vLLM's own prefix cache off; it serves
  prompt 1 (1,100 tokens) twice and prompt 2 (1,024 tokens, a whole number of blocks and chunks)
  twice, each the second time from lmcache's CPU tier;
* then the test corrupts the data of prompt 2's last chunk file on disk;
* instance B, a new process sharing A's disk directory, names the connector by the plugin's
  registered name and serves prompt 1 (from disk) and prompt 2 (whose last chunk fails to load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcache_core.keys import TokenHasher

from vllm_helpers import VllmRun, make_prompt, run_vllm, write_config

CHUNK = 256
#: the longest hits with 128-token blocks (whole blocks before the last token) for prompts of
#: 1,100 tokens and of 1,024 tokens (whose last block holds the last token)
HIT = 1024
HIT_ALIGNED = 896


@dataclass
class TwoInstances:
    a: VllmRun
    b: VllmRun
    corrupted_chunk: str


@pytest.fixture(scope="module")
def two_instances(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> TwoInstances:
    work = tmp_path_factory.mktemp("e2e")
    disk = work / "disk"
    config = write_config(
        work / "lmcache.yaml",
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.5,
        local_disk=str(disk),
        max_local_disk_size=1.0,
        lmcache_instance_id="e2e",
    )
    p1, p2 = make_prompt(1), make_prompt(2, length=1024)
    a = run_vllm(
        {
            "model": str(tiny_model),
            "connector": "module_path",
            "enable_prefix_caching": False,
            "steps": [
                {"prompt": p1, "max_tokens": 16},
                {"prompt": p1, "max_tokens": 16},
                {"prompt": p2, "max_tokens": 16},
                {"prompt": p2, "max_tokens": 16},
            ],
        },
        work,
        config,
        "a",
    )
    # flip bytes in the data (not the header) of prompt 2's last stored chunk
    last_hash = TokenHasher(CHUNK).hashes(p2)[-1]
    (victim,) = [f for f in disk.iterdir() if f"{last_hash:016x}" in f.name]
    size = victim.stat().st_size
    with victim.open("r+b") as f:
        f.seek(size - 64)
        data = f.read(16)
        f.seek(size - 64)
        f.write(bytes(b ^ 0xFF for b in data))
    b = run_vllm(
        {
            "model": str(tiny_model),
            "connector": "plugin",
            "enable_prefix_caching": True,
            "steps": [{"prompt": p1, "max_tokens": 16}, {"prompt": p2, "max_tokens": 16}],
        },
        work,
        config,
        "b",
    )
    return TwoInstances(a, b, victim.name)


def test_outputs_depend_on_the_prompt(two_instances: TwoInstances) -> None:
    """Sanity for every equality below: the tiny model's greedy output follows its context."""
    a = two_instances.a.outputs
    assert a[0]["token_ids"] != a[2]["token_ids"]
    assert len(set(a[0]["token_ids"])) > 4


def test_repeated_prompt_is_loaded_from_cpu_with_identical_output(
    two_instances: TwoInstances,
) -> None:
    first, second = two_instances.a.outputs[:2]
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == HIT  # vLLM's prefix cache is off: all external
    assert second["token_ids"] == first["token_ids"]
    assert f"loaded {HIT} tokens (0..{HIT}); chunk hits per location: {{'LocalCPUBackend': 4}}" in (
        two_instances.a.log
    )


def test_block_aligned_prompt_loads_all_but_its_last_block_with_identical_output(
    two_instances: TwoInstances,
) -> None:
    """Its 4 stored chunks are all full; the load takes 3.5 of them and vLLM computes 1 block."""
    first, second = two_instances.a.outputs[2:4]
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == HIT_ALIGNED
    assert second["token_ids"] == first["token_ids"]
    assert (
        f"loaded {HIT_ALIGNED} tokens (0..{HIT_ALIGNED}); "
        "chunk hits per location: {'LocalCPUBackend': 4}"
    ) in two_instances.a.log


def test_new_instance_sharing_the_disk_loads_the_prompt_with_identical_output(
    two_instances: TwoInstances,
) -> None:
    served_by_a = two_instances.a.outputs[0]
    from_disk = two_instances.b.outputs[0]
    assert from_disk["num_cached_tokens"] == HIT
    assert from_disk["token_ids"] == served_by_a["token_ids"]
    assert "chunk hits per location: {'LocalDiskBackend': 4}" in two_instances.b.log


def test_failed_chunk_load_is_recomputed_with_identical_output(
    two_instances: TwoInstances,
) -> None:
    served_by_a = two_instances.a.outputs[2]
    recovered = two_instances.b.outputs[1]
    assert recovered["token_ids"] == served_by_a["token_ids"]
    log = two_instances.b.log
    assert f"loaded {3 * CHUNK} of {HIT_ALIGNED} tokens; vLLM recomputes 1 block(s)" in log
    assert "Recovered from KV load failure" in log
    assert "data checksum mismatch" in log


def test_connector_loads_by_module_path_and_by_registered_name(
    two_instances: TwoInstances,
) -> None:
    assert "kv_connector='LMCacheConnectorV1'" in two_instances.a.log
    assert "kv_connector_module_path='lmcache_connector_vllm.connector'" in two_instances.a.log
    assert "kv_connector='LMCacheCoreConnectorV1'" in two_instances.b.log
    assert "kv_connector_module_path=None" in two_instances.b.log
    for run in (two_instances.a, two_instances.b):
        assert "lmcache connector worker 0: locations ['LocalCPUBackend', 'LocalDiskBackend']" in run.log


def test_scheduler_and_worker_in_one_process_find_hits_without_a_second_process(
    tmp_path: Path, tiny_model: Path
) -> None:
    """``VLLM_ENABLE_V1_MULTIPROCESSING=0``: both connector roles live in the caller's process."""
    config = write_config(tmp_path / "lmcache.yaml", chunk_size=CHUNK, max_local_cpu_size=0.25)
    prompt = make_prompt(3)
    run = run_vllm(
        {
            "model": str(tiny_model),
            "connector": "plugin",
            "steps": [{"prompt": prompt, "max_tokens": 8}, {"prompt": prompt, "max_tokens": 8}],
        },
        tmp_path,
        config,
        "inproc",
        extra_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    first, second = run.outputs
    assert second["num_cached_tokens"] == HIT
    assert second["token_ids"] == first["token_ids"]
    assert "(EngineCore" not in run.log and "(Worker" not in run.log  # one process did it all
