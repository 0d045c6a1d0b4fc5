"""A stand-in serving instance: a cache engine holding KV for a prompt, reporting to a controller.

It reads its settings like a real instance (``LMCACHE_CONFIG_FILE`` plus ``LMCACHE_*``
environment variables), stores deterministic KV tensors for the given token ids in every
enabled location (CPU, and disk when ``local_disk`` is set), prints one JSON line once its
worker has registered with the controller and published what it holds::

    {"ready": true, "stored_tokens": 12, "locations": ["LocalCPUBackend"], ...}

and then runs until SIGTERM or SIGINT, when it shuts down cleanly (exit status 0).

With ``--control`` it also reads one JSON request per line on stdin and answers each with one
JSON line on stdout, so a test can put an instance under pressure and see what its locations
hold: ``{"op": "store", "tokens": [...]}`` -> ``{"stored_tokens": n}`` (stored, written and
published to the controller); ``{"op": "where", "tokens": [...]}`` -> ``{"chunks": {location:
[held, ...]}}`` (per chunk of the tokens); ``{"op": "stats"}`` -> ``{"stats": {location:
{...}}}``; anything else -> ``{"error": "..."}``.

    LMCACHE_CONFIG_FILE=examples/example.yaml python examples/instance.py

Errors (bad settings, no registration within ``--ready-timeout``) go to stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import numpy as np
import torch

from lmcache_core.cli_nats import parse_tokens
from lmcache_core.config import LMCacheSettings, load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import LMCacheError
from lmcache_core.plugins import get_plugin_manager
from lmcache_core.worker import WorkerHandle, start_worker

#: the 12-token prompt of the walkthrough
DEFAULT_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


def kv_for(tokens: Sequence[int], num_layers: int, hidden: int) -> torch.Tensor:
    """Deterministic KV, ``[num_layers, 2, len(tokens), hidden]`` bfloat16, derived from the ids.

    Anyone can recompute it to check a round trip bit for bit.
    """
    ids = torch.tensor(list(tokens), dtype=torch.float32) % 997
    layer = torch.arange(num_layers, dtype=torch.float32).view(-1, 1, 1, 1)
    kv = torch.arange(2, dtype=torch.float32).view(1, -1, 1, 1)
    h = torch.arange(hidden, dtype=torch.float32).view(1, 1, 1, -1)
    values = ids.view(1, 1, -1, 1) * 0.01 + layer + kv * 0.5 + h * 0.001
    return values.to(torch.bfloat16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="demo-model", help="model name (part of every chunk key)"
    )
    parser.add_argument("--world-size", type=int, default=1, help="tensor-parallel world size")
    parser.add_argument(
        "--worker-id", type=int, default=0, help="this process's tensor-parallel rank"
    )
    parser.add_argument(
        "--tokens", type=parse_tokens, default=DEFAULT_PROMPT, help="token ids to store, e.g. 1,2,3"
    )
    parser.add_argument(
        "--store-random",
        type=int,
        default=0,
        metavar="N",
        help="also store N chunks of a seeded random token sequence (for load tests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --store-random")
    parser.add_argument("--num-layers", type=int, default=2, help="layers of the stored KV tensors")
    parser.add_argument(
        "--hidden", type=int, default=64, help="last dimension of the stored KV tensors"
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the controller to accept the registration",
    )
    parser.add_argument(
        "--control", action="store_true", help="answer JSON requests on stdin (see the module's doc)"
    )
    parser.add_argument("--log-level", default="WARNING", help="Python log level on stderr")
    return parser


def run(args: argparse.Namespace) -> int:
    pm = get_plugin_manager()
    settings = load_settings(pm)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    metadata = EngineMetadata(args.model, world_size=args.world_size, worker_id=args.worker_id)
    # the worker is started here rather than by the engine so this script owns its handle
    with CacheEngine(settings, metadata, pm, start_worker=False) as engine:
        worker = start_worker(engine) if settings.enable_controller else None
        try:
            return _serve(args, settings, engine, worker, stop)
        finally:
            if worker is not None:
                worker.close()


def _serve(
    args: argparse.Namespace,
    settings: LMCacheSettings,
    engine: CacheEngine,
    worker: WorkerHandle | None,
    stop: threading.Event,
) -> int:
    """Store the KV, wait until the controller knows it, print the ready line, wait for a signal."""
    stored = engine.store(args.tokens, kv_for(args.tokens, args.num_layers, args.hidden))
    if args.store_random > 0:
        rng = np.random.default_rng(args.seed)
        random_tokens = rng.integers(0, 128_000, size=args.store_random * engine.chunk_size)
        stored += engine.store(
            random_tokens,
            chunk_fn=lambda start, end: kv_for(
                random_tokens[start:end].tolist(), args.num_layers, args.hidden
            ),
        )
    engine.flush()
    if worker is not None:
        if not worker.wait_registered(args.ready_timeout):
            print(
                f"instance.py: error: no controller accepted the registration within "
                f"{args.ready_timeout:g}s at {settings.controller_address}",
                file=sys.stderr,
            )
            return 2
        worker.sync(timeout=args.ready_timeout)
    ready = {
        "ready": True,
        "stored_tokens": stored,
        "locations": engine.locations,
        "instance_id": settings.lmcache_instance_id,
        "worker_id": args.worker_id,
        "chunk_size": engine.chunk_size,
        "controller": worker is not None,
    }
    print(json.dumps(ready), flush=True)
    if args.control:
        # a daemon thread: a read blocked on stdin must not keep a stopping instance alive
        threading.Thread(
            target=_answer_requests, args=(args, engine, worker), name="control", daemon=True
        ).start()
    stop.wait()
    return 0


def _answer_requests(args: argparse.Namespace, engine: CacheEngine, worker: WorkerHandle | None) -> None:
    """``--control``: answer each JSON request line on stdin with one JSON line, until EOF."""
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = _answer(args, engine, worker, request["op"], request.get("tokens") or [])
        except (ValueError, KeyError, TypeError, LMCacheError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


def _answer(
    args: argparse.Namespace, engine: CacheEngine, worker: WorkerHandle | None, op: str, tokens: list[int]
) -> dict[str, object]:
    if op == "store":
        stored = engine.store(tokens, kv_for(tokens, args.num_layers, args.hidden))
        engine.flush()
        if worker is not None:
            worker.sync(timeout=args.ready_timeout)
        return {"stored_tokens": stored}
    if op == "where":
        keys = [engine.keys.key(h) for h in engine.hasher.hashes(tokens)]
        return {"chunks": {name: [b.contains(k) for k in keys] for name, b in engine.backends.items()}}
    if op == "stats":
        return {"stats": engine.stats()}
    raise ValueError(f"unknown op {op!r}; known: store, where, stats")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except LMCacheError as exc:
        print(f"instance.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
