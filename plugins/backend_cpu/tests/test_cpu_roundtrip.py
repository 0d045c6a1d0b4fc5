"""Storing and reading back chunks: bit-exact, zero-copy, any dtype and layout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmcache_core.errors import BackendError

from lmcache_backend_cpu import ALIGNMENT, LocalCPUBackend

from cpu_helpers import key

MakeBackend = Callable[[int], LocalCPUBackend]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, bits: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` holding random bit patterns (NaN payloads, subnormals, -0 ...)."""
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, shape, dtype=torch.int64).to(bits)
    return raw.view(dtype)


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [(torch.float16, torch.int16), (torch.bfloat16, torch.int16), (torch.float32, torch.int32)],
)
def test_round_trip_is_bit_exact(make_backend: MakeBackend, dtype: torch.dtype, bits: torch.dtype) -> None:
    backend = make_backend(1 << 20)
    data = random_bits((2, 3, 16, 64), dtype, bits)
    assert backend.put(key(1), data, num_tokens=16)
    with backend.get(key(1)) as view:
        assert view.tensor.dtype == dtype and view.tensor.shape == data.shape
        assert view.num_tokens == 16
        assert torch.equal(view.tensor.view(bits), data.view(bits))


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int64, torch.float64, torch.bool, torch.complex64]
)
def test_other_dtypes_round_trip(make_backend: MakeBackend, dtype: torch.dtype) -> None:
    backend = make_backend(1 << 16)
    data = torch.randint(0, 2 if dtype == torch.bool else 100, (7, 5)).to(dtype)
    assert backend.put(key(1), data, num_tokens=7)
    with backend.get(key(1)) as view:
        assert view.tensor.dtype == dtype and torch.equal(view.tensor, data)


@pytest.mark.parametrize(
    "make_source",
    [
        lambda t: t.transpose(0, 2),
        lambda t: t[:, ::2, 1:],
        lambda t: t[0, :1].expand(5, 8, 32),  # stride 0 along the first dimension
        lambda t: t.permute(2, 0, 1)[3:40:3],
    ],
    ids=["transposed", "strided-slice", "expanded", "permuted-slice"],
)
def test_non_contiguous_sources_round_trip_bit_exact(
    make_backend: MakeBackend, make_source: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    backend = make_backend(1 << 20)
    source = make_source(random_bits((4, 8, 32), torch.bfloat16, torch.int16))
    assert not source.is_contiguous()
    assert backend.put(key(1), source, num_tokens=3)
    with backend.get(key(1)) as view:
        assert view.tensor.shape == source.shape and view.tensor.is_contiguous()
        assert torch.equal(view.tensor.view(torch.int16), source.contiguous().view(torch.int16))


def test_store_copies_once_without_a_contiguous_clone(make_backend: MakeBackend) -> None:
    backend = make_backend(1 << 20)
    source = torch.randn(64, 128).t()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert backend.put(key(1), source, num_tokens=1)
    ops = [event.name for event in prof.events()]
    assert ops.count("aten::copy_") == 1
    assert not {"aten::clone", "aten::contiguous"} & set(ops)


def test_get_returns_a_view_of_the_pool_without_copying(make_backend: MakeBackend) -> None:
    backend = make_backend(1 << 16)
    backend.put(key(1), torch.arange(100, dtype=torch.float32), num_tokens=1)
    backend.put(key(2), torch.arange(10, dtype=torch.float16), num_tokens=1)
    pool_start = backend._pool.data_ptr()
    views = [backend.get(key(1)), backend.get(key(2))]
    for view in views:
        assert view is not None
        offset = view.tensor.data_ptr() - pool_start
        assert 0 <= offset < backend.capacity_bytes and offset % ALIGNMENT == 0
        # writing through the view changes what the next reader sees: same memory
        view.tensor[0] = 42
    with backend.get(key(1)) as again:
        assert again.tensor[0].item() == 42
    for view in views:
        view.release()


def test_storing_a_present_key_is_a_no_op_that_returns_true(make_backend: MakeBackend) -> None:
    backend = make_backend(1 << 16)
    assert backend.put(key(1), torch.ones(10), num_tokens=10)
    assert backend.put(key(1), torch.zeros(20), num_tokens=20)
    with backend.get(key(1)) as view:
        assert torch.equal(view.tensor, torch.ones(10)) and view.num_tokens == 10
    assert backend.stats()["chunks"] == 1 and backend.stats()["tokens"] == 10


def test_on_done_runs_once_before_put_returns_stored_or_refused(make_backend: MakeBackend) -> None:
    backend = make_backend(1024)
    calls: list[str] = []
    assert backend.put(key(1), torch.ones(8), 1, on_done=lambda: calls.append("stored"))
    assert not backend.put(key(2), torch.ones(1000), 1, on_done=lambda: calls.append("refused"))
    assert calls == ["stored", "refused"]


def test_miss_returns_none_and_counts_hits_and_misses(make_backend: MakeBackend) -> None:
    backend = make_backend(1024)
    backend.put(key(1), torch.ones(8), 1)
    assert backend.get(key(2)) is None
    backend.get(key(1)).release()
    stats = backend.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)
    assert not backend.contains(key(2)) and backend.contains(key(1))


def test_empty_chunk_round_trips_without_taking_room(make_backend: MakeBackend) -> None:
    backend = make_backend(128)
    assert backend.put(key(1), torch.empty(0, 16, dtype=torch.float16), num_tokens=0)
    assert backend.put(key(2), torch.ones(32), num_tokens=1)  # the whole pool still fits
    with backend.get(key(1)) as view:
        assert view.tensor.shape == (0, 16)


def test_failed_copy_raises_backend_error_and_frees_the_reservation(make_backend: MakeBackend) -> None:
    backend = make_backend(1 << 16)
    meta = torch.empty(64, device="meta")  # has a size but no data: copying from it fails
    with pytest.raises(BackendError, match="cannot store"):
        backend.put(key(1), meta, num_tokens=1)
    stats = backend.stats()
    assert stats["used_bytes"] == 0 and stats["free_bytes"] == 1 << 16
    assert not backend.contains(key(1))
    assert backend.put(key(1), torch.ones(64), num_tokens=1)


def test_closed_backend_refuses_use_but_views_stay_readable(make_backend: MakeBackend) -> None:
    backend = make_backend(1 << 16)
    backend.put(key(1), torch.arange(16.0), num_tokens=1)
    view = backend.get(key(1))
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.put(key(2), torch.ones(4), num_tokens=1)
    assert torch.equal(view.tensor, torch.arange(16.0))
    view.release()
