"""LocalDiskBackend against plain file I/O on the same disk, in the same run.

Write: put N chunks through the backend (fsync on) and flush, versus writing the same bytes
to N files with a plain write + fsync each. Read: ``get`` every chunk (header, one read into a
fresh tensor, checksum) versus a plain read of each baseline file. Reads run twice: warm (the
pages are still cached after writing, for both sides) and cold (each file's cached pages
dropped first with posix_fadvise(DONTNEED), for both sides). Each figure is the best of
``--repeat`` runs, the two sides taking turns to go first so drift hits both.

    python benchmarks/bench_disk_backend.py [--chunks 16] [--chunk-mib 32] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmcache_core.events import EventBus
from lmcache_core.keys import ChunkKey
from lmcache_backend_disk import LocalDiskBackend

TARGET_RATIO = 0.7


def keys(n: int) -> list[ChunkKey]:
    return [ChunkKey("bench/model", 1, 0, "bfloat16", i) for i in range(n)]


def make_chunks(n: int, chunk_bytes: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8, generator=gen).view(torch.bfloat16)
        for _ in range(n)
    ]


def drop_cached_pages(paths: list[Path]) -> None:
    """Ask the kernel to forget the files' (clean, fsynced) pages so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class BackendRun:
    """One backend on a fresh directory: write all, then read all."""

    def __init__(self, root: Path, chunks: list[torch.Tensor]) -> None:
        self.directory = root / "backend"
        shutil.rmtree(self.directory, ignore_errors=True)
        self.chunks = chunks
        self.keys = keys(len(chunks))
        self.backend = LocalDiskBackend(
            self.directory,
            EventBus().sink("LocalDiskBackend"),
            capacity_bytes=4 * sum(c.numel() * c.element_size() for c in chunks),
            write_queue_size=len(chunks),
            fsync=True,
        )

    def write(self) -> None:
        for key, chunk in zip(self.keys, self.chunks):
            self.backend.put(key, chunk, 256)
        if not self.backend.flush(timeout=300):
            raise RuntimeError("the disk writer did not finish in 300 s")

    def read(self) -> None:
        for key in self.keys:
            view = self.backend.get(key)
            if view is None:
                raise RuntimeError(f"chunk {key.to_string()} missing")
            view.release()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.kvchunk"))

    def check(self) -> None:
        with self.backend.get(self.keys[-1]) as view:
            assert torch.equal(view.tensor.view(torch.uint8), self.chunks[-1].view(torch.uint8))

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class BaselineRun:
    """Plain files: open, write, fsync, close; then open, read into a fresh buffer, close."""

    def __init__(self, root: Path, chunks: list[torch.Tensor]) -> None:
        self.directory = root / "baseline"
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        self.chunks = chunks
        self.paths = [self.directory / f"chunk{i}.bin" for i in range(len(chunks))]

    def write(self) -> None:
        for path, chunk in zip(self.paths, self.chunks):
            with open(path, "wb", buffering=0) as f:
                f.write(chunk.view(torch.uint8).numpy())
                os.fsync(f.fileno())

    def read(self) -> None:
        for path in self.paths:
            with open(path, "rb", buffering=0) as f:
                buffer = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)  # like get's tensor
                view = memoryview(buffer)
                while view:
                    view = view[f.readinto(view) :]

    def files(self) -> list[Path]:
        return self.paths

    def check(self) -> None:
        pass

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def measure(run: BackendRun | BaselineRun) -> dict[str, float]:
    try:
        seconds = {"write": timed(run.write)}
        run.check()
        seconds["read warm"] = timed(run.read)
        drop_cached_pages(run.files())
        seconds["read cold"] = timed(run.read)
        return seconds
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=16, help="number of chunks")
    parser.add_argument("--chunk-mib", type=int, default=32, help="MiB per chunk")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each side; best is kept")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a real disk)")
    args = parser.parse_args()

    chunk_bytes = args.chunk_mib * 1024 * 1024
    total = args.chunks * chunk_bytes
    chunks = make_chunks(args.chunks, chunk_bytes)
    root = Path(tempfile.mkdtemp(prefix="bench-disk-", dir=args.dir))
    best: dict[str, dict[str, float]] = {"backend": {}, "baseline": {}}
    try:
        sides: list[tuple[str, type[BackendRun] | type[BaselineRun]]] = [
            ("backend", BackendRun),
            ("baseline", BaselineRun),
        ]
        for _ in range(args.repeat):
            for name, cls in sides:
                for phase, seconds in measure(cls(root, chunks)).items():
                    best[name][phase] = min(seconds, best[name].get(phase, float("inf")))
            sides.reverse()  # whoever went first goes second next time
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"LocalDiskBackend vs plain files: {args.chunks} chunks x {args.chunk_mib} MiB "
        f"= {total / 2**30:.2f} GiB, fsync on, best of {args.repeat}, directory on "
        f"{args.dir or tempfile.gettempdir()}"
    )
    print(f"{'phase':<11} {'backend MB/s':>13} {'baseline MB/s':>14} {'ratio':>7}  target >= {TARGET_RATIO}")
    below = []
    for phase in ("write", "read warm", "read cold"):
        ours = total / best["backend"][phase] / 1e6
        base = total / best["baseline"][phase] / 1e6
        ratio = ours / base
        mark = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        if ratio < TARGET_RATIO:
            below.append(phase)
        print(f"{phase:<11} {ours:>13.0f} {base:>14.0f} {ratio:>7.2f}  {mark}")
    print(
        "write: backend = put all + flush (checksum, temp file, fsync, rename, directory fsync);"
        " baseline = write + fsync per file."
    )
    print(
        "read warm: both sides read from the page cache (the files were just written);"
        " read cold: both sides' cached pages dropped with posix_fadvise(DONTNEED) first."
    )
    print("backend reads also verify each chunk's xxh3 checksum; baseline reads do not.")
    if below:
        print(f"below target: {', '.join(below)}")


if __name__ == "__main__":
    main()
