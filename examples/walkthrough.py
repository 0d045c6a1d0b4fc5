"""The cache-controller walkthrough, end to end: a controller, one instance, lookup, clear, lookup.

    python examples/walkthrough.py            # ports 9000 (HTTP) and 9001 (bus), or free ones
    python examples/walkthrough.py --free-ports

It starts ``lmcache_controller`` with an embedded NATS server (``--monitor-port``), then one
stand-in instance (``examples/instance.py``) configured like ``examples/example.yaml`` plus a
disk tier in a temporary directory, which stores KV for a 12-token prompt. It then prints each
HTTP request and response: lookup (the CPU tier holds all 12 tokens), clear the CPU tier,
lookup (the disk tier still does), clear the disk tier, lookup (nobody does), and stops
everything it started. Exit status 0 when every answer was the expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from lmcache_connector_vllm.demo import show_call, stop_process
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.errors import LMCacheError
from lmcache_core.testing import free_port

HERE = Path(__file__).resolve().parent
PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"
READY_TIMEOUT = 90.0  # first start on a busy machine imports torch; generous but bounded


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_ready(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The JSON ready line ``proc`` prints; exits with its stderr when it never comes."""
    try:
        return read_ready_line(proc, what, READY_TIMEOUT)
    except LMCacheError as exc:
        raise SystemExit(f"walkthrough: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=9000, help="controller HTTP port")
    parser.add_argument("--monitor-port", type=int, default=9001, help="controller message-bus port")
    parser.add_argument("--free-ports", action="store_true", help="use free ports instead")
    args = parser.parse_args(argv)
    port, monitor = args.port, args.monitor_port
    if args.free_ports or not (port_is_free(args.host, port) and port_is_free(args.host, monitor)):
        if not args.free_ports:
            print(f"# ports {port}/{monitor} are taken; using free ones")
        port, monitor = free_port(args.host), free_port(args.host)

    env = {k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}
    env.setdefault("LMCACHE_WORKER_HEARTBEAT_INTERVAL", "0.5")
    procs: list[subprocess.Popen[str]] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="lmcache-walkthrough-") as tmp:
        try:
            cmd = [sys.executable, "-m", "lmcache_core.controller.cli", "--host", args.host, "--port", str(port),
                   "--monitor-port", str(monitor), "--log-level", "WARNING"]
            print("$ " + " ".join(["lmcache_controller", *cmd[3:]]))
            controller = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(controller)
            print(f"  -> {json.dumps(wait_ready(controller, 'the controller'))}")

            config = Path(tmp) / "example.yaml"
            text = (HERE / "example.yaml").read_text(encoding="utf-8")
            text = text.replace("localhost:9001", f"{args.host}:{monitor}")
            text += f'local_disk: "file://{tmp}/disk/"\nmax_local_disk_size: 1\n'
            config.write_text(text, encoding="utf-8")
            print(f"$ LMCACHE_CONFIG_FILE={config} python examples/instance.py   # CPU + disk, stores the prompt")
            instance = subprocess.Popen(
                [sys.executable, str(HERE / "instance.py"), "--tokens", ",".join(map(str, PROMPT))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**env, "LMCACHE_CONFIG_FILE": str(config)},
            )
            procs.append(instance)
            print(f"  -> {json.dumps(wait_ready(instance, 'the instance'))}")

            with httpx.Client(base_url=f"http://{args.host}:{port}", timeout=30) as client:
                lookup = {"tokens": PROMPT}
                steps: list[tuple[str, dict[str, Any], str, Any]] = [
                    ("/lookup", lookup, "layout_info", {INSTANCE: ["LocalCPUBackend", 12]}),
                    ("/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}, "num_tokens", 12),
                    ("/lookup", lookup, "layout_info", {INSTANCE: ["LocalDiskBackend", 12]}),
                    ("/clear", {"instance_id": INSTANCE, "location": "LocalDiskBackend"}, "num_tokens", 12),
                    ("/lookup", lookup, "layout_info", {}),
                ]
                for path, body, key, expected in steps:
                    got = show_call(client, path, body).json().get(key)
                    if got != expected:
                        ok = False
                        print(f"  !! expected {key} = {json.dumps(expected)}")
        finally:
            for proc in reversed(procs):  # the instance first, then the controller (and its NATS)
                code = stop_process(proc, timeout=20)
                if code not in (0, -signal.SIGINT):
                    ok = False
                    err = proc.stderr.read() if proc.stderr else ""
                    print(f"# {proc.args[1]} exited with {code}: {err[-1000:]}")
    print("# walkthrough " + ("finished: every answer as expected" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
