"""The cache-controller walkthrough with a real vLLM server: complete, lookup, clear, recompute.

    python examples/vllm_walkthrough.py                 # what `make demo` runs
    python examples/vllm_walkthrough.py --model DIR     # a model directory with weights instead

It writes a tiny 2-layer Llama ``config.json`` into a temporary directory (vLLM fills it with
``--load-format dummy`` weights: nothing is downloaded), starts ``lmcache_controller`` with an
embedded NATS server, writes an lmcache YAML (CPU tier, disk tier in the temporary directory,
reporting to the controller) and starts vLLM's OpenAI-compatible server with our connector. It
then prints each request as a ``curl`` line and each answer: a completion of a 1,100-token
prompt (stored), /lookup (LocalCPUBackend holds 1,024 tokens: whole 256-token chunks), the same
completion again (1,024 tokens loaded from the cache, same output), /clear LocalCPUBackend,
/lookup (LocalDiskBackend still holds them), /clear LocalDiskBackend, /lookup (nobody does), and
a last completion (recomputed, same output). It stops everything it started, also on Ctrl-C
or SIGTERM. Exit status 0 when every answer was the expected one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from lmcache_connector_vllm.demo import (
    PLUGIN_CONFIG,
    make_prompt,
    poll_until,
    show_call,
    stop_process,
    write_config,
    write_tiny_llama,
)
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.errors import LMCacheError
from lmcache_core.testing import free_port

CHUNK = 256  # a multiple of vLLM's CPU block size (128)
PROMPT_LENGTH = 1100
HIT = PROMPT_LENGTH // CHUNK * CHUNK  # only whole chunks are stored: 1,024 tokens
PROMPT_SEED = 1
MAX_TOKENS = 16
SETTLE_TIMEOUT = 30.0  # the worker reports chunks to the controller asynchronously


class Walkthrough:
    """The steps of the demo against a running vLLM and controller, and every answer checked."""

    def __init__(self, model: str, instance: str, vllm: httpx.Client, ctl: httpx.Client) -> None:
        self.model = model
        self.instance = instance
        self.vllm = vllm
        self.ctl = ctl
        self.prompt = make_prompt(PROMPT_SEED, PROMPT_LENGTH)
        self.shell_vars = {"PROMPT": self.prompt}
        self.record: dict[str, list[Any]] = {"completions": [], "lookups": [], "clears": []}
        self.ok = True

    def expect(self, what: str, got: Any, expected: Any) -> None:
        if got != expected:
            self.ok = False
            print(f"  !! expected {what} = {json.dumps(expected)}, got {json.dumps(got)}", flush=True)

    def complete(self, expected_cached: int) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        response = show_call(self.vllm, "/v1/completions", body, self.shell_vars)
        if response.status_code != 200:
            self.expect("status", response.status_code, 200)
            self.record["completions"].append(None)
            return
        data = response.json()
        result = {"token_ids": data["choices"][0]["token_ids"],
                  "cached_tokens": data["usage"]["prompt_tokens_details"]["cached_tokens"]}
        self.expect("usage.prompt_tokens_details.cached_tokens", result["cached_tokens"], expected_cached)
        if self.record["completions"]:
            self.expect("token_ids (as the first completion)", result["token_ids"],
                        self.record["completions"][0]["token_ids"])
        self.record["completions"].append(result)

    def lookup(self, expected: dict[str, Any]) -> None:
        # wait (bounded) for the reports to reach the controller, then show one call
        def quiet() -> Any:
            return self.ctl.post("/lookup", json={"tokens": self.prompt}).json().get("layout_info")

        try:
            poll_until(quiet, lambda got: got == expected, SETTLE_TIMEOUT, "/lookup")
        except TimeoutError:
            pass  # the call below shows what the controller answers instead
        response = show_call(self.ctl, "/lookup", {"tokens": self.prompt}, self.shell_vars)
        got = response.json().get("layout_info")
        self.expect("layout_info", got, expected)
        self.record["lookups"].append(got)

    def clear(self, location: str, expected_tokens: int) -> None:
        body = {"instance_id": self.instance, "location": location}
        got = show_call(self.ctl, "/clear", body).json().get("num_tokens")
        self.expect("num_tokens", got, expected_tokens)
        self.record["clears"].append(got)

    def run(self) -> None:
        """The steps, in the order an operator would try them."""
        where = {self.instance: ["LocalCPUBackend", HIT]}
        print("# 1. a completion computes the prompt; the connector stores its whole chunks")
        self.complete(expected_cached=0)
        print("# 2. the controller knows which instance holds the prompt, and where")
        self.lookup(where)
        print("# 3. the same prompt again: vLLM loads 1,024 tokens from the cache, same output")
        self.complete(expected_cached=HIT)
        print("# 4. drop the CPU tier; the disk tier still holds the chunks")
        self.clear("LocalCPUBackend", HIT)
        self.lookup({self.instance: ["LocalDiskBackend", HIT]})
        print("# 5. drop the disk tier too; nobody holds the prompt")
        self.clear("LocalDiskBackend", HIT)
        self.lookup({})
        print("# 6. the prompt is recomputed, with the same output")
        self.complete(expected_cached=0)


def wait_for_vllm(server: subprocess.Popen[bytes], client: httpx.Client, log: Path, timeout: float) -> None:
    """Return once ``/health`` answers 200; exit with the log's tail if vLLM dies or is late."""
    started = time.monotonic()
    last_note = [started]

    def healthy() -> bool:
        if server.poll() is not None:
            raise LMCacheError(f"vLLM exited with status {server.returncode}")
        now = time.monotonic()
        if now - last_note[0] >= 15:
            last_note[0] = now
            print(f"# waiting for vLLM to load the model ({now - started:.0f}s) ...", flush=True)
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        poll_until(healthy, bool, timeout, "vLLM /health", interval=0.5)
    except (LMCacheError, TimeoutError) as exc:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"vllm_walkthrough: {exc}\n--- end of {log}:\n{tail}") from None
    print(f"# vLLM is ready after {time.monotonic() - started:.0f}s", flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, through every cleanup below


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="controller HTTP port (0: a free one)")
    parser.add_argument("--monitor-port", type=int, default=0, help="controller message-bus port (0: a free one)")
    parser.add_argument("--vllm-port", type=int, default=0, help="vLLM HTTP port (0: a free one)")
    parser.add_argument("--model", help="a Llama model directory with weights (default: tiny config, dummy weights)")
    parser.add_argument("--instance-id", default="vllm-demo", help="lmcache_instance_id of the vLLM server")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds vLLM may take to start")
    parser.add_argument("--result-json", type=Path, help="also write every answer checked to this file")
    args = parser.parse_args(argv)
    port, monitor, vllm_port = (p or free_port(args.host) for p in (args.port, args.monitor_port, args.vllm_port))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell ignored it

    env = {k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}
    env.setdefault("LMCACHE_WORKER_HEARTBEAT_INTERVAL", "0.5")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of vLLM KV cache: plenty for the demo
    procs: list[subprocess.Popen[Any]] = []
    demo: Walkthrough | None = None
    ok = False
    with tempfile.TemporaryDirectory(prefix="lmcache-vllm-walkthrough-") as tmp:
        work = Path(tmp)
        try:
            if args.model:
                model, load_format = str(Path(args.model).resolve()), "auto"
            else:
                model, load_format = str(write_tiny_llama(work / "tiny-llama", weights=False)), "dummy"
                print(f"# a tiny 2-layer Llama config in {model} (vLLM fills in dummy weights)")

            controller_log = work / "controller.log"
            cmd = [sys.executable, "-m", "lmcache_core.controller.cli", "--host", args.host, "--port", str(port),
                   "--monitor-port", str(monitor), "--log-level", "WARNING"]
            print("$ " + " ".join(["lmcache_controller", *cmd[3:]]), flush=True)
            with controller_log.open("w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                              start_new_session=True))
            try:
                print(f"  -> {json.dumps(read_ready_line(procs[0], 'the controller', 60))}", flush=True)
            except LMCacheError as exc:
                raise SystemExit(f"vllm_walkthrough: {exc}{controller_log.read_text()[-3000:]}") from None

            config = write_config(
                work / "lmcache.yaml", chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.5,
                local_disk=f"file://{work}/disk/", max_local_disk_size=1, enable_controller=True,
                lmcache_instance_id=args.instance_id, controller_url=f"{args.host}:{monitor}",
            )
            print(f"$ cat {config}\n" + config.read_text().rstrip())
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--load-format", load_format, "--host", args.host, "--port", str(vllm_port),
                   "--skip-tokenizer-init", "--enforce-eager", "--dtype", "float32", "--max-model-len", "4096",
                   "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
                   "--kv-transfer-config", json.dumps(PLUGIN_CONFIG, separators=(",", ":"))]
            log = work / "vllm.log"
            shown = " ".join(f"'{a}'" if a.startswith("{") else a for a in ["python", *cmd[1:]])
            print(f"$ LMCACHE_CONFIG_FILE={config} {shown}   # log: {log}", flush=True)
            with log.open("w") as out:
                # its own session: Ctrl-C reaches only this script, which stops vLLM and its engine
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                              env={**env, "LMCACHE_CONFIG_FILE": str(config)}))
            with (httpx.Client(base_url=f"http://{args.host}:{vllm_port}", timeout=300) as vllm,
                  httpx.Client(base_url=f"http://{args.host}:{port}", timeout=30) as ctl):
                wait_for_vllm(procs[1], vllm, log, args.start_timeout)
                print("$ PROMPT=$(python -c 'from lmcache_connector_vllm.demo import make_prompt; "
                      f"print(make_prompt({PROMPT_SEED}, {PROMPT_LENGTH}))')   # {PROMPT_LENGTH} token ids")
                demo = Walkthrough(model, args.instance_id, vllm, ctl)
                demo.run()
                ok = demo.ok
        except KeyboardInterrupt:
            print("# interrupted", flush=True)
        finally:
            for proc in reversed(procs):  # vLLM first, then the controller (and its NATS server)
                code = stop_process(proc, timeout=60)
                if code not in (0, -signal.SIGINT):
                    ok = False
                    print(f"# {' '.join(map(str, proc.args[1:4]))} exited with status {code}", flush=True)
            if args.result_json is not None:
                record = demo.record if demo is not None else {}
                args.result_json.write_text(json.dumps({**record, "ok": ok}))
    print("# vllm walkthrough " + ("finished: every answer as expected" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
