"""A real vLLM 0.32 on CPU with the connector: every prompt token cached, token-granular hits
from CPU and disk, outputs identical to vLLM without the connector, recompute after a failed
load, and both ways of naming the connector.

Three vLLM processes serve the whole module (starting vLLM dominates the runtime):

* a baseline without the connector serves every prompt once;
* instance A names the connector by module path, keeps vLLM's default
  ``kv_load_failure_policy`` and its own prefix cache off; it serves each prompt twice, the
  second time loading all but its last token from lmcache's CPU tier;
* then the test corrupts the data of the 1,024-token prompt's last chunk file on disk;
* instance B, a new process sharing A's disk directory, names the connector by the plugin's
  registered name and serves the 1,100-token prompt (from disk) and the 1,024-token one (whose
  corrupt last chunk is never promised: vLLM computes those tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lmcache_core.keys import TokenHasher

from vllm_helpers import VllmRun, make_prompt, run_vllm, write_config

CHUNK = 256
#: around vLLM's CPU block (128 tokens) and our chunk (256 tokens), and longer than both
LENGTHS = [1, 12, 127, 128, 129, 255, 256, 257, 1100]
ALIGNED = 1024  # whole blocks and whole chunks
MAX_TOKENS = 8


def prompts() -> dict[int, list[int]]:
    return {n: make_prompt(n, length=n) for n in [*LENGTHS, ALIGNED]}


@dataclass
class Runs:
    baseline: VllmRun
    a: VllmRun
    b: VllmRun

    def a_pair(self, n: int) -> tuple[dict, dict]:
        i = [*LENGTHS, ALIGNED].index(n)
        return self.a.outputs[2 * i], self.a.outputs[2 * i + 1]

    def baseline_of(self, n: int) -> dict:
        return self.baseline.outputs[[*LENGTHS, ALIGNED].index(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Runs:
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
    by_length = prompts()
    step = lambda p: {"prompt": p, "max_tokens": MAX_TOKENS}  # noqa: E731
    base = {"model": str(tiny_model), "enable_prefix_caching": False}
    baseline = run_vllm(
        {**base, "connector": None, "steps": [step(p) for p in by_length.values()]},
        work, config, "baseline",
    )
    a = run_vllm(
        {
            **base,
            "connector": "module_path",
            "load_failure_policy": None,  # vLLM's default ("fail")
            "steps": [step(p) for p in by_length.values() for _ in range(2)],
        },
        work, config, "a",
    )
    # flip bytes in the data (not the header) of the aligned prompt's last stored chunk
    last_hash = TokenHasher(CHUNK).hashes(by_length[ALIGNED])[-1]
    (victim,) = [f for f in disk.rglob("*.kvchunk") if f"{last_hash:016x}" in f.name]
    size = victim.stat().st_size
    with victim.open("r+b") as f:
        f.seek(size - 64)
        data = f.read(16)
        f.seek(size - 64)
        f.write(bytes(b ^ 0xFF for b in data))
    b = run_vllm(
        {
            **base,
            "connector": "plugin",
            "enable_prefix_caching": True,
            "steps": [step(by_length[1100]), step(by_length[ALIGNED])],
        },
        work, config, "b",
    )
    return Runs(baseline, a, b)


def test_outputs_depend_on_the_prompt(runs: Runs) -> None:
    """Sanity for every equality below: the tiny model's greedy output follows its context."""
    outputs = [runs.baseline_of(n)["token_ids"] for n in LENGTHS]
    assert len({tuple(o) for o in outputs}) == len(outputs)
    assert len(set(runs.baseline_of(1100)["token_ids"])) > 3


@pytest.mark.parametrize("n", LENGTHS + [ALIGNED])
def test_repeated_prompt_loads_all_but_its_last_token_with_the_output_of_vllm_alone(
    runs: Runs, n: int
) -> None:
    first, second = runs.a_pair(n)
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == n - 1  # vLLM's prefix cache is off: all from lmcache
    expected = runs.baseline_of(n)["token_ids"]
    assert first["token_ids"] == expected
    assert second["token_ids"] == expected


def test_each_repeat_was_loaded_from_the_cpu_tier_token_by_token(runs: Runs) -> None:
    for n in LENGTHS + [ALIGNED]:
        if n == 1:
            continue
        chunks = -(-(n - 1) // CHUNK)  # the chunks holding the loaded tokens
        assert (
            f"loaded {n - 1} tokens (0..{n - 1}); chunks per location: {{'LocalCPUBackend': {chunks}}}"
        ) in runs.a.log, n
    assert "lmcache load for request" not in runs.a.log  # no load failed
    assert "KV load failure" not in runs.a.log


def test_new_instance_sharing_the_disk_loads_the_prompt_with_identical_output(runs: Runs) -> None:
    from_disk = runs.b.outputs[0]
    assert from_disk["num_cached_tokens"] == 1099
    assert from_disk["token_ids"] == runs.baseline_of(1100)["token_ids"]
    assert "loaded 1099 tokens (0..1099); chunks per location: {'LocalDiskBackend': 5}" in runs.b.log


def test_a_corrupt_chunk_is_never_promised_the_rest_is_recomputed_with_identical_output(
    runs: Runs,
) -> None:
    """The lookup itself reads (and holds) the chunks, so the corrupt last one is a miss there:
    vLLM is promised the 768 good tokens, loads them, and computes the rest."""
    recovered = runs.b.outputs[1]
    assert recovered["num_cached_tokens"] == 3 * CHUNK
    assert recovered["token_ids"] == runs.baseline_of(ALIGNED)["token_ids"]
    log = runs.b.log
    assert f"loaded {3 * CHUNK} tokens (0..{3 * CHUNK})" in log
    assert "data checksum mismatch" in log
    assert "KV load failure" not in log


def test_connector_loads_by_module_path_and_by_registered_name(runs: Runs) -> None:
    assert "kv_connector='LMCacheConnectorV1'" in runs.a.log
    assert "kv_connector_module_path='lmcache_connector_vllm.connector'" in runs.a.log
    assert "kv_connector='LMCacheCoreConnectorV1'" in runs.b.log
    assert "kv_connector_module_path=None" in runs.b.log
    for run in (runs.a, runs.b):
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
    assert second["num_cached_tokens"] == len(prompt) - 1
    assert second["token_ids"] == first["token_ids"]
    assert "(EngineCore" not in run.log and "(Worker" not in run.log  # one process did it all
