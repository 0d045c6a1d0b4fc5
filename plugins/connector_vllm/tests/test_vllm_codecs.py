"""A real vLLM 0.32 on CPU with a compressed CPU tier (``store_codecs``): repeats load from
the compressed chunks with the output of vLLM alone through the lossless zstd; through the lossy
int8 the stored KV stays within the codec's stated bound (checked on the real KV, chunk file by
chunk file against the zstd run's files, which hold the same KV bit for bit).

Two vLLM processes, one with ``LocalCPUBackend: zstd`` and one with ``LocalCPUBackend: int8``;
each serves every prompt twice and writes its chunks behind to its own disk directory, in the
CPU tier's encoded form. The reference output is a prompt's first (cold) pass, which vLLM
computes itself: ``test_vllm_end_to_end`` shows a cold pass with the connector answers exactly
as vLLM without it, and here both processes' cold passes must agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmcache_core.codecs import decode_chunk

from lmcache_backend_disk.chunkfile import read_chunk
from vllm_helpers import VllmRun, make_prompt, run_vllm, write_config

lmcache_codecs = pytest.importorskip("lmcache_codecs", reason="needs the codecs plugin: pip install -e plugins/codecs")

CHUNK = 256
LENGTHS = [300, 1100]
MAX_TOKENS = 8


@dataclass
class CodecRuns:
    zstd: VllmRun
    int8: VllmRun
    work: Path

    def pair(self, run: VllmRun, i: int) -> tuple[dict, dict]:
        return run.outputs[2 * i], run.outputs[2 * i + 1]

    def expected(self, i: int) -> list[int]:
        """What vLLM computes for prompt ``i``: the zstd run's cold pass."""
        return self.zstd.outputs[2 * i]["token_ids"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> CodecRuns:
    work = tmp_path_factory.mktemp("codecs")
    prompts = [make_prompt(i + 7, length=n) for i, n in enumerate(LENGTHS)]
    step = lambda p: {"prompt": p, "max_tokens": MAX_TOKENS}  # noqa: E731
    base = {"model": str(tiny_model), "enable_prefix_caching": False, "dtype": "bfloat16"}
    done = {}
    for codec in ("zstd", "int8"):
        config = write_config(
            work / f"{codec}.yaml",
            chunk_size=CHUNK,
            max_local_cpu_size=0.5,
            local_disk=str(work / f"disk-{codec}"),
            max_local_disk_size=1.0,
            lmcache_instance_id=f"codec-{codec}",
            store_codecs={"LocalCPUBackend": codec},
        )
        steps = [step(p) for p in prompts for _ in range(2)]
        done[codec] = run_vllm({**base, "connector": "plugin", "steps": steps}, work, config, codec)
    (work / "prompts.txt").write_text(repr(prompts))
    return CodecRuns(done["zstd"], done["int8"], work)


@pytest.mark.parametrize("i", range(len(LENGTHS)))
def test_zstd_cpu_tier_loads_the_repeat_with_the_output_of_vllm_alone(runs: CodecRuns, i: int) -> None:
    n = LENGTHS[i]
    first, second = runs.pair(runs.zstd, i)
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == n - 1
    # both processes computed the cold pass alike (the reference is sound)
    assert runs.pair(runs.int8, i)[0]["token_ids"] == first["token_ids"]
    assert second["token_ids"] == runs.expected(i)
    chunks = -(-(n - 1) // CHUNK)
    assert f"chunks per location: {{'LocalCPUBackend': {chunks}}}" in runs.zstd.log
    assert "cannot be decoded" not in runs.zstd.log


def _chunk_files(disk: Path) -> dict[str, Path]:
    return {f.name: f for f in disk.rglob("*.kvchunk")}


def test_the_chunks_were_stored_encoded_and_zstd_is_smaller_than_the_kv(runs: CodecRuns) -> None:
    for codec in ("zstd", "int8"):
        files = _chunk_files(runs.work / f"disk-{codec}")
        assert len(files) == sum(-(-n // CHUNK) for n in LENGTHS)
        for path in files.values():
            with path.open("rb", buffering=0) as f:
                payload, header = read_chunk(f, _key_of(path))
            assert header.encoding is not None and header.encoding.codec == codec
            raw_bytes = torch.Size(header.encoding.shape).numel() * header.encoding.dtype.itemsize
            assert payload.numel() < raw_bytes
            assert header.encoding.dtype == torch.bfloat16


def _key_of(path: Path):
    from lmcache_backend_disk.chunkfile import read_header

    with path.open("rb", buffering=0) as f:
        return read_header(f, os.fstat(f.fileno()).st_size).key


def test_int8_keeps_the_real_kv_within_its_stated_bound(runs: CodecRuns) -> None:
    specs = {"zstd": lmcache_codecs.ZSTD, "int8": lmcache_codecs.INT8}
    exact_files = _chunk_files(runs.work / "disk-zstd")
    lossy_files = _chunk_files(runs.work / "disk-int8")
    # the same model, prompts and chunking give the same keys (the instance id is not in them)
    assert set(exact_files) == set(lossy_files)
    worst = 0.0
    for name, path in exact_files.items():
        decoded = {}
        for codec, p in (("zstd", path), ("int8", lossy_files[name])):
            with p.open("rb", buffering=0) as f:
                payload, header = read_chunk(f, _key_of(p))
            decoded[codec] = decode_chunk(specs[codec], payload, header.encoding)
        x, y = decoded["zstd"], decoded["int8"]
        error = (y.double() - x.double()).abs()
        bound = lmcache_codecs.int8_error_bound(x, y)
        assert bool((error <= bound).all()), f"{name}: worst excess {(error - bound).max().item()}"
        channel_max = x.double().abs().amax(dim=-2, keepdim=True).clamp_min(1e-30)
        worst = max(worst, float((error / channel_max).max()))
    print(f"int8 on real KV: largest error {worst:.4%} of its channel's largest magnitude")
    assert 0 < worst <= 1 / 254 + 2**-8


@pytest.mark.parametrize("i", range(len(LENGTHS)))
def test_int8_cpu_tier_loads_the_repeat_and_reports_whether_the_output_matched(runs: CodecRuns, i: int) -> None:
    n = LENGTHS[i]
    first, second = runs.pair(runs.int8, i)
    assert first["num_cached_tokens"] == 0 and second["num_cached_tokens"] == n - 1
    expected = runs.expected(i)
    assert first["token_ids"] == expected  # computed, not loaded
    same = second["token_ids"] == expected
    matching = sum(a == b for a, b in zip(second["token_ids"], expected))
    # reported, not asserted: a lossy KV may change a greedy pick (the bound above is the promise)
    print(f"int8, {n}-token prompt: greedy output {'identical' if same else 'differs'} "
          f"({matching}/{len(expected)} tokens equal)")
