"""The cache-controller walkthrough with a real vLLM server: LMCache's documented steps, then more.

    python examples/vllm_walkthrough.py                 # what `make demo` runs
    python examples/vllm_walkthrough.py --model DIR     # a model directory with weights instead
    python examples/vllm_walkthrough.py --yaml-form pull --part lmcache

Part 1 is LMCache's own "Clear the KV cache" walkthrough, verbatim but for the ports: it starts
``lmcache_controller --host localhost --port P --monitor-port M``, writes the docs'
``example.yaml`` (``--yaml-form push``: ``controller_url``, ``distributed_url``,
``lmcache_worker_port``; ``pull``: ``controller_pull_url``, ``lmcache_worker_ports``,
``p2p_host``, ``p2p_init_ports``), starts vLLM's OpenAI server with the connector named by
``kv_connector`` and ``kv_connector_module_path`` only, sends the docs' request (its 12 token
ids: the server has no tokenizer), and shows /lookup crediting 12 tokens at LocalCPUBackend,
/clear answering ``num_tokens: 12`` and /lookup answering ``{}``.

Part 2 goes further with a second vLLM server (CPU and disk tiers): a completion of a 1,100-token
prompt (every token stored), /lookup (LocalCPUBackend holds 1,100 tokens), the same completion
again (1,099 tokens loaded, same output), /clear LocalCPUBackend, /lookup (LocalDiskBackend still
holds them), /clear LocalDiskBackend, /lookup (nobody does), and a last completion (recomputed,
same output).

The model is a tiny 2-layer Llama ``config.json`` with Llama 3's vocabulary size, written into a
temporary directory (vLLM fills it with ``--load-format dummy`` weights: nothing is
downloaded). The script prints each request as a ``curl`` line and each answer, stops everything
it started, also on Ctrl-C or SIGTERM, and exits 0 when every answer was the expected one.
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

CHUNK = 256
#: the docs' request, "Explain the significance of KV cache in language models.", as token ids
LMCACHE_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
LMCACHE_INSTANCE = "lmcache_default_instance"
LLAMA3_VOCAB = 128256
PROMPT_LENGTH = 1100
PROMPT_SEED = 1
MAX_TOKENS = 16
SETTLE_TIMEOUT = 30.0  # the worker reports chunks to the controller asynchronously
#: the connector as LMCache's docs name it, plus where vLLM finds our class
DOCS_KV_CONFIG = {
    "kv_connector": "LMCacheConnectorV1",
    "kv_connector_module_path": "lmcache_connector_vllm.connector",
    "kv_role": "kv_both",
}


def example_yaml(form: str, host: str, monitor: int, worker_port: int, other_port: int) -> str:
    """LMCache's ``example.yaml`` for the clear walkthrough, in its two documented forms."""
    common = (
        "chunk_size: 256\nlocal_cpu: True\nmax_local_cpu_size: 5\n\n"
        "# cache controller configurations\nenable_controller: True\n"
        f'lmcache_instance_id: "{LMCACHE_INSTANCE}"\n'
    )
    if form == "push":
        return common + (
            f'controller_url: "{host}:{monitor}"\ndistributed_url: "{host}:{other_port}"\n'
            f"lmcache_worker_port: {worker_port}\n"
        )
    return common + (
        f'controller_pull_url: "{host}:{monitor}"\nlmcache_worker_ports: {worker_port}\n\n'
        f'# Peer identifiers\np2p_host: "{host}"\np2p_init_ports: {other_port}\n'
    )


class Walkthrough:
    """Requests against a running vLLM and controller, every answer checked and recorded."""

    def __init__(
        self, model: str, instance: str, vllm: httpx.Client, ctl: httpx.Client, prompt: list[int],
        shell_vars: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.instance = instance
        self.vllm = vllm
        self.ctl = ctl
        self.prompt = prompt
        self.shell_vars = shell_vars or {}
        self.record: dict[str, list[Any]] = {"completions": [], "lookups": [], "clears": []}
        self.ok = True

    def expect(self, what: str, got: Any, expected: Any) -> None:
        if got != expected:
            self.ok = False
            print(f"  !! expected {what} = {json.dumps(expected)}, got {json.dumps(got)}", flush=True)

    def complete(self, expected_cached: int | None, max_tokens: int = MAX_TOKENS, **extra: Any) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": max_tokens, **extra}
        response = show_call(self.vllm, "/v1/completions", body, self.shell_vars)
        if response.status_code != 200:
            self.expect("status", response.status_code, 200)
            self.record["completions"].append(None)
            return
        data = response.json()
        details = data["usage"].get("prompt_tokens_details") or {}
        result = {"token_ids": data["choices"][0].get("token_ids"), "cached_tokens": details.get("cached_tokens")}
        if expected_cached is not None:
            self.expect("usage.prompt_tokens_details.cached_tokens", result["cached_tokens"], expected_cached)
        if self.record["completions"] and result["token_ids"] is not None:
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

    def run_lmcache_docs(self) -> None:
        """LMCache's documented steps: one request, then lookup, clear and lookup again."""
        n = len(self.prompt)
        print("# 1. send a request to vLLM (the docs' prompt as its 12 Llama 3 token ids)")
        self.complete(expected_cached=None, max_tokens=10)
        print("# 2. the controller credits the instance with all 12 prompt tokens")
        self.lookup({self.instance: ["LocalCPUBackend", n]})
        print("# 3. clear the KV cache in the system")
        self.clear("LocalCPUBackend", n)
        print("# 4. the lookup returns an empty result")
        self.lookup({})

    def run_long_prompt(self) -> None:
        """Both tiers, a long prompt, loads with identical outputs, clears, recompute."""
        n = len(self.prompt)
        greedy = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
        where = {self.instance: ["LocalCPUBackend", n]}
        print("# 5. a completion computes a 1,100-token prompt; the connector stores every token")
        self.complete(expected_cached=0, **greedy)
        print("# 6. the controller knows which instance holds the prompt, and where")
        self.lookup(where)
        print("# 7. the same prompt again: vLLM loads 1,099 tokens from the cache, same output")
        self.complete(expected_cached=n - 1, **greedy)
        print("# 8. drop the CPU tier; the disk tier still holds the chunks")
        self.clear("LocalCPUBackend", n)
        self.lookup({self.instance: ["LocalDiskBackend", n]})
        print("# 9. drop the disk tier too; nobody holds the prompt")
        self.clear("LocalDiskBackend", n)
        self.lookup({})
        print("# 10. the prompt is recomputed, with the same output")
        self.complete(expected_cached=0, **greedy)


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


def start_vllm(
    work: Path, name: str, model: str, load_format: str, config: Path, kv_config: dict[str, str],
    host: str, port: int, env: dict[str, str], extra: list[str],
) -> tuple[subprocess.Popen[bytes], Path]:
    """vLLM's OpenAI-compatible server with the connector, printed as the command it runs."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--load-format", load_format, "--host", host, "--port", str(port),
           "--skip-tokenizer-init", "--enforce-eager", "--dtype", "float32", "--max-model-len", "4096",
           "--enable-prompt-tokens-details", *extra,
           "--kv-transfer-config", json.dumps(kv_config, separators=(",", ":"))]
    log = work / f"{name}.log"
    shown = " ".join(f"'{a}'" if a.startswith("{") else a for a in ["python", *cmd[1:]])
    print(f"$ LMCACHE_CONFIG_FILE={config} {shown}   # log: {log}", flush=True)
    with log.open("w") as out:
        # its own session: Ctrl-C reaches only this script, which stops vLLM and its engine
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "LMCACHE_CONFIG_FILE": str(config)})
    return proc, log


def stop(proc: subprocess.Popen[Any]) -> bool:
    """Stop a process this script started; False when it had failed."""
    code = stop_process(proc, timeout=60)
    if code in (0, -signal.SIGINT):
        return True
    print(f"# {' '.join(map(str, proc.args[1:4]))} exited with status {code}", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=0, help="controller HTTP port (0: a free one)")
    parser.add_argument("--monitor-port", type=int, default=0, help="controller message-bus port (0: a free one)")
    parser.add_argument("--vllm-port", type=int, default=0, help="vLLM HTTP port (0: a free one)")
    parser.add_argument("--model", help="a Llama model directory with weights (default: tiny config, dummy weights)")
    parser.add_argument("--instance-id", default="vllm-demo", help="lmcache_instance_id of part 2's vLLM server")
    parser.add_argument("--yaml-form", choices=["push", "pull"], default="push",
                        help="which of LMCache's two example.yaml forms part 1 uses")
    parser.add_argument("--part", choices=["all", "lmcache", "long"], default="all",
                        help="lmcache: LMCache's documented steps only; long: the long-prompt part only")
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
    records: dict[str, Any] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="lmcache-vllm-walkthrough-") as tmp:
        work = Path(tmp)
        try:
            if args.model:
                model, load_format = str(Path(args.model).resolve()), "auto"
            else:
                model = str(write_tiny_llama(work / "tiny-llama", vocab=LLAMA3_VOCAB, weights=False))
                load_format = "dummy"
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
                print(f"# the controller's web page (instances, rates, live events): http://{args.host}:{port}/", flush=True)
            except LMCacheError as exc:
                raise SystemExit(f"vllm_walkthrough: {exc}{controller_log.read_text()[-3000:]}") from None

            with (httpx.Client(base_url=f"http://{args.host}:{vllm_port}", timeout=300) as vllm,
                  httpx.Client(base_url=f"http://{args.host}:{port}", timeout=30) as ctl):
                if args.part in ("all", "lmcache"):
                    print("# Part 1: LMCache's 'Clear the KV cache' walkthrough, only the ports changed")
                    config = work / "example.yaml"
                    config.write_text(example_yaml(args.yaml_form, args.host, monitor, free_port(args.host),
                                                   free_port(args.host)))
                    print(f"$ cat {config}\n" + config.read_text().rstrip())
                    proc, log = start_vllm(work, "vllm-docs", model, load_format, config, DOCS_KV_CONFIG,
                                           args.host, vllm_port, env, [])
                    procs.append(proc)
                    wait_for_vllm(proc, vllm, log, args.start_timeout)
                    docs = Walkthrough(model, LMCACHE_INSTANCE, vllm, ctl, LMCACHE_PROMPT)
                    docs.run_lmcache_docs()
                    records["lmcache"], ok = docs.record, ok and docs.ok
                    ok = stop(procs.pop()) and ok
                if args.part in ("all", "long"):
                    print("# Part 2: a long prompt, both tiers, loads with the same output")
                    config = write_config(
                        work / "lmcache.yaml", chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.5,
                        local_disk=f"file://{work}/disk/", max_local_disk_size=1, enable_controller=True,
                        lmcache_instance_id=args.instance_id, controller_url=f"{args.host}:{monitor}",
                    )
                    print(f"$ cat {config}\n" + config.read_text().rstrip())
                    proc, log = start_vllm(work, "vllm-long", model, load_format, config, PLUGIN_CONFIG,
                                           args.host, vllm_port, env, ["--no-enable-prefix-caching"])
                    procs.append(proc)
                    wait_for_vllm(proc, vllm, log, args.start_timeout)
                    print("$ PROMPT=$(python -c 'from lmcache_connector_vllm.demo import make_prompt; "
                          f"print(make_prompt({PROMPT_SEED}, {PROMPT_LENGTH}))')   # {PROMPT_LENGTH} token ids")
                    prompt = make_prompt(PROMPT_SEED, PROMPT_LENGTH)
                    long = Walkthrough(model, args.instance_id, vllm, ctl, prompt, {"PROMPT": prompt})
                    long.run_long_prompt()
                    records["long"], ok = long.record, ok and long.ok
        except KeyboardInterrupt:
            print("# interrupted", flush=True)
            ok = False
        finally:
            for proc in reversed(procs):  # vLLM first, then the controller (and its NATS server)
                ok = stop(proc) and ok
            if args.result_json is not None:
                args.result_json.write_text(json.dumps({**records, "ok": ok}))
    print("# vllm walkthrough " + ("finished: every answer as expected" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
