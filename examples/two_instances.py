"""Two instances, two locations each, one controller: who holds which prefix, and clearing one.

    python examples/two_instances.py

Starts ``lmcache_controller`` (embedded NATS on a free port) and two stand-in instances
(``examples/instance.py``), each with ``LocalCPUBackend`` and ``LocalDiskBackend`` (a temporary
directory) and chunk size 4: ``instance_a`` stores the whole 12-token prompt, ``instance_b``
only its first 8 tokens. It prints each request and response: a lookup credits each instance
with its own prefix; clearing ``instance_a``'s CPU tier leaves its disk tier and ``instance_b``
untouched. Exit status 0 when every answer was the expected one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lmcache_connector_vllm.demo import show_call, stop_process  # noqa: E402
from lmcache_core.testing import free_port  # noqa: E402
from walkthrough import PROMPT, wait_ready  # noqa: E402

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def start_instance(name: str, tokens: list[int], bus: str, disk: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    settings = {
        "LMCACHE_ENABLE_CONTROLLER": "true",
        "LMCACHE_CONTROLLER_URL": bus,
        "LMCACHE_LMCACHE_INSTANCE_ID": name,
        "LMCACHE_CHUNK_SIZE": "4",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05",
        "LMCACHE_LOCAL_DISK": str(disk),
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1",
    }
    print(f"$ {' '.join(f'{k}={v}' for k, v in settings.items())} \\\n    python examples/instance.py --tokens {','.join(map(str, tokens))}")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "instance.py"), "--tokens", ",".join(map(str, tokens))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **settings},
    )
    print(f"  -> {json.dumps(wait_ready(proc, name))}")
    return proc


def main() -> int:
    host = "127.0.0.1"
    port, monitor = free_port(host), free_port(host)
    env = {k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}
    procs: list[subprocess.Popen[str]] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="lmcache-two-instances-") as tmp:
        try:
            cmd = [sys.executable, "-m", "lmcache_core.controller.cli", "--host", host, "--port", str(port),
                   "--monitor-port", str(monitor), "--log-level", "WARNING"]
            print("$ " + " ".join(["lmcache_controller", *cmd[3:]]))
            controller = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(controller)
            print(f"  -> {json.dumps(wait_ready(controller, 'the controller'))}")
            bus = f"{host}:{monitor}"
            procs.append(start_instance("instance_a", PROMPT, bus, Path(tmp) / "a", env))
            procs.append(start_instance("instance_b", PROMPT[:8], bus, Path(tmp) / "b", env))

            lookup = {"tokens": PROMPT}
            steps: list[tuple[str, dict[str, Any], str, Any]] = [
                ("/lookup", lookup, "layout_info", {"instance_a": [CPU, 12], "instance_b": [CPU, 8]}),
                ("/clear", {"instance_id": "instance_a", "location": CPU}, "num_tokens", 12),
                ("/lookup", lookup, "layout_info", {"instance_a": [DISK, 12], "instance_b": [CPU, 8]}),
                ("/lookup", {"tokens": PROMPT, "instance_id": "instance_b"}, "layout_info", {"instance_b": [CPU, 8]}),
            ]
            with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
                for path, body, key, expected in steps:
                    got = show_call(client, path, body).json().get(key)
                    if got != expected:
                        ok = False
                        print(f"  !! expected {key} = {json.dumps(expected)}")
                print(f"$ curl http://{host}:{port}/instances")
                for inst in client.get("/instances").json()["instances"]:
                    per_loc = {n: l["chunks"] for w in inst["workers"] for n, l in w["locations"].items()}
                    print(f"  -> {inst['instance_id']}: chunks per location {json.dumps(per_loc)}")
        finally:
            for proc in reversed(procs):
                stop_process(proc)
    print("# two instances " + ("finished: every answer as expected" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
