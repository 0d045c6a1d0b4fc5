"""``lmcache_controller``: run the cache controller (HTTP API plus the workers' message bus).

    lmcache_controller --host localhost --port 9000 --monitor-port 9001

``--monitor-port`` starts the transport's own server (a real ``nats-server``) on that port for
workers to reach (their ``controller_url``); ``--nats-url`` uses an existing server or cluster
(``nats://a:4222,nats://b:4222``: the bus connects to one and fails over to the others)
instead. Once serving, one JSON line goes to stdout::

    {"ready": true, "http": "http://localhost:9000", "bus": "nats://localhost:9001", "pid": 123}

SIGINT or SIGTERM stops everything it started, in reverse order. Bad arguments, a port in use
or a startup failure print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import anyio

from lmcache_core.cli import run_cli
from lmcache_core.errors import LMCacheError

API_TOKEN_ENV = "LMCACHE_CONTROLLER_API_TOKEN"
PROG = "lmcache_controller"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 0 and 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost", help="address the HTTP API (and --monitor-port) listen on")
    parser.add_argument("--port", type=_port, default=9000, help="HTTP API port (0: any free port)")
    parser.add_argument("--monitor-port", type=_port, help="start an embedded message server on this port")
    parser.add_argument(
        "--nats-url",
        help="use this existing NATS server, or a cluster (URLs separated by commas), instead of --monitor-port",
    )
    parser.add_argument("--config", help="settings YAML file (default: $LMCACHE_CONFIG_FILE)")
    parser.add_argument("--api-token", help=f"require this bearer token on every endpoint (default: ${API_TOKEN_ENV})")
    parser.add_argument("--ssl-certfile", help="serve the HTTP API over HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", help="the PEM private key of --ssl-certfile")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="log level on stderr",
    )
    parser.add_argument("--startup-timeout", type=float, default=30.0, help="seconds allowed for startup")
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from lmcache_core.config import load_settings
    from lmcache_core.controller.server import running_controller
    from lmcache_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    overrides = {}
    # an empty token given is kept, so the settings refuse it rather than running without auth
    token = args.api_token if args.api_token is not None else os.environ.get(API_TOKEN_ENV)
    if token is not None:
        overrides["controller_api_token"] = token
    settings = load_settings(pm, config_file=args.config, **overrides)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_controller(
            settings,
            host=args.host,
            port=args.port,
            nats_url=args.nats_url,
            monitor_port=args.monitor_port,
            pm=pm,
            startup_timeout=args.startup_timeout,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
        ) as handle:
            print(
                json.dumps({"ready": True, "http": handle.url, "bus": handle.bus_url, "pid": os.getpid()}),
                flush=True,
            )
            async with anyio.create_task_group() as tg:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        logging.getLogger(__name__).info("%s received; stopping", signal.Signals(signum).name)
                        break
                    tg.cancel_scope.cancel()

                async def stop_when_served() -> None:
                    await handle.served.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on_signal)
                tg.start_soon(stop_when_served)
    return 0


def read_ready_line(proc: "subprocess.Popen[str]", what: str, timeout: float = 60.0) -> dict[str, Any]:
    """The JSON ready line a process prints (this CLI, ``examples/instance.py``), waiting at most
    ``timeout`` seconds; ``LMCacheError`` with the end of its stderr when it never comes.

    For scripts and tests that start a controller or an instance as a subprocess (text mode,
    stdout piped). Lines that are not a JSON object with ``"ready"`` are skipped.
    """
    found: dict[str, Any] = {}
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("ready"):
                found.update(data)
                break
        done.set()

    threading.Thread(target=read, name=f"ready-line-{proc.pid}", daemon=True).start()
    if not done.wait(timeout) or not found:
        proc.kill()
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise LMCacheError(f"{what} did not get ready (exit status {proc.wait()}): {err[-3000:]}")
    return found


def _event_loop_options() -> dict[str, object]:
    try:
        import uvloop  # noqa: F401  # a faster loop for the HTTP and bus hot paths
    except ImportError:
        return {}
    return {"use_uvloop": True}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.monitor_port is None and args.nats_url is None:
        print(f"{PROG}: error: give --monitor-port (embedded NATS server) or --nats-url (existing one)", file=sys.stderr)
        return 2
    if args.monitor_port is not None and args.nats_url is not None:
        print(f"{PROG}: error: give either --monitor-port or --nats-url, not both", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_cli(PROG, lambda: anyio.run(_serve, args, backend_options=_event_loop_options()))


if __name__ == "__main__":
    sys.exit(main())
