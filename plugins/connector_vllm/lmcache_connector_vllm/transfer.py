"""Getting saved chunks out of the forward pass's way: device copies, then background stores.

A save gathers a prompt's missing chunks out of vLLM's paged KV cache on the cache's own
device (``PagedKV.gather``). On CUDA the gather is queued on the current stream, so it reads
the blocks before any later kernel reuses them, and each chunk is copied to pinned host memory
on a side stream; the save returns once those copies are queued. A ``BackgroundStorer`` thread
waits for each copy and hands the chunks to the ``CacheEngine``. On CPU the same code runs with
no streams: the gather is done when it returns, and the engine still stores in the background.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_core.engine import CacheEngine
from lmcache_core.errors import LMCacheError
from lmcache_core.keys import ChunkSpan

log = logging.getLogger("vllm.lmcache_connector_vllm")


@dataclass
class SaveJob:
    """Chunks of one request to store once ``ready`` (a CUDA event, or None: ready now)."""

    req_id: str
    chunks: list[tuple[ChunkSpan, torch.Tensor]]
    ready: Any = None


class DeviceStager:
    """Copies device chunks to host memory without waiting for them (CUDA); no-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, chunks: list[tuple[ChunkSpan, torch.Tensor]]) -> tuple[list[tuple[ChunkSpan, torch.Tensor]], Any]:
        """Host copies of ``chunks`` and the event that marks them complete (None on CPU)."""
        stream = self._stream
        if stream is None:
            return chunks, None
        gathered = torch.cuda.Event()
        gathered.record()  # the gathers queued on the current stream
        stream.wait_event(gathered)
        out = []
        with torch.cuda.stream(stream):
            for span, dev in chunks:
                host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                host.copy_(dev, non_blocking=True)
                dev.record_stream(stream)  # its memory is not reused before the copy is done
                out.append((span, host))
        done = torch.cuda.Event()
        done.record(stream)
        return out, done

    def finish_loads(self) -> None:
        """Wait until copies into the device read their host sources (before releasing them)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).synchronize()


class BackgroundStorer:
    """One owned thread that stores ``SaveJob``s into the engine, in submission order."""

    def __init__(self, engine: CacheEngine, max_jobs: int) -> None:
        self._engine = engine
        self._queue: queue.Queue[SaveJob | None] = queue.Queue(maxsize=max_jobs)
        self._idle = threading.Condition()
        self._unfinished = 0
        self.stored_tokens = 0
        self.dropped_jobs = 0
        self.failed_jobs = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmcache-storer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> bool:
        """Queue ``job``; False (and counted) when the queue is full or closed: a future miss."""
        with self._idle:
            if self._closed:
                return False
            self._unfinished += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._job_done()
            self.dropped_jobs += 1
            log.warning(
                "lmcache: save of request %s dropped, %d saves already wait for the storer "
                "(connector_vllm_save_queue)", job.req_id, self._queue.maxsize,
            )
            return False
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is stored; True when none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                self.stored_tokens += self._engine.store_chunks(job.chunks)
            except (LMCacheError, RuntimeError, ValueError) as exc:
                # a failed save is a future miss, never a failed request
                self.failed_jobs += 1
                log.warning("lmcache store for request %s failed: %s", job.req_id, exc)
            finally:
                job.chunks.clear()
                self._job_done()

    def _job_done(self) -> None:
        with self._idle:
            self._unfinished -= 1
            self._idle.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Store what is queued, then stop the thread."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
