"""Pieces shared by the walkthrough scripts (``examples/``) and the connector's tests.

A tiny Llama model directory, the connector's ``--kv-transfer-config``, lmcache config files,
deterministic prompts, and the process handling every script repeats: poll with a deadline,
stop a process (and what it spawned) within a bounded time, echo an HTTP call as ``curl``.
Nothing here imports vLLM; torch is imported only to write model weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

T = TypeVar("T")

#: our connector by the name its ``vllm.general_plugins`` entry point registers
PLUGIN_CONFIG: dict[str, str] = {
    "kv_connector": "LMCacheCoreConnectorV1",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}
#: our connector by module path (works without the entry point)
MODULE_PATH_CONFIG: dict[str, str] = {
    "kv_connector": "LMCacheConnectorV1",
    "kv_connector_module_path": "lmcache_connector_vllm.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}


def write_tiny_llama(
    directory: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
    vocab: int = 1024,
    max_position: int = 4096,
    weights: bool = True,
    seed: int = 0,
) -> Path:
    """A Llama ``config.json`` and (with ``weights``) random but well-scaled safetensors.

    Random weights of a realistic scale make the next token depend on the whole context, so
    a wrong KV block changes the output; vLLM's ``dummy`` weights are too small for that.
    Without ``weights`` the directory serves ``--load-format dummy`` (nothing to download).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if not weights:
        return path
    import torch  # only here: writing a config alone must stay cheap
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * (1.0 / shape[-1] ** 0.5)

    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(vocab, hidden) * 4,
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden) * 2,
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden) * 2,
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
            }
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def make_prompt(seed: int, length: int = 1100, vocab: int = 1024) -> list[int]:
    """``length`` token ids drawn from ``[3, vocab)``, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def write_config(path: Path, **settings: Any) -> Path:
    """An lmcache YAML config file (what ``LMCACHE_CONFIG_FILE`` names)."""
    path.write_text(yaml.safe_dump(settings))
    return path


def poll_until(
    fn: Callable[[], T],
    until: Callable[[T], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Call ``fn`` until ``until(result)`` holds; ``TimeoutError`` naming ``what`` after ``timeout`` s.

    For state another process reaches on its own time (a server up, a report delivered), where
    no event can be awaited across the process boundary.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if until(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still {result!r} after {timeout:g}s")
        time.sleep(interval)


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGINT, timeout: float = 30.0
) -> int:
    """Stop ``proc`` with ``sig``, then SIGKILL after ``timeout`` s; its exit status.

    A process started with ``start_new_session=True`` leads its own group: whatever it spawned
    and left behind (vLLM's engine core) is killed with the group, so nothing is orphaned.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone: the usual, clean case
    return proc.returncode


def show_call(
    client: httpx.Client,
    path: str,
    body: dict[str, Any],
    shell_vars: dict[str, Any] | None = None,
) -> httpx.Response:
    """POST ``body`` to ``path``, printing it as a copy-pasteable ``curl`` line, then the answer.

    A body value equal to one of ``shell_vars`` is printed as that shell variable (``$PROMPT``)
    so a long token list is printed once, where the script defines it. In the printed answer,
    lists longer than 16 items are shortened and null fields left out.
    """
    fields = []
    for key, value in body.items():
        name = next((n for n, v in (shell_vars or {}).items() if v == value), None)
        shown = f"'\"${name}\"'" if name else json.dumps(value)
        fields.append(f"{json.dumps(key)}: {shown}")
    print(
        f"$ curl -X POST {client.base_url}{path} -H 'Content-Type: application/json'"
        f" -d '{{{', '.join(fields)}}}'",
        flush=True,
    )
    response = client.post(path, json=body)
    try:
        shown_answer: Any = _shorten(response.json())
    except ValueError:
        shown_answer = response.text
    print(f"  -> {response.status_code} {json.dumps(shown_answer)}", flush=True)
    return response


def _shorten(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        items = [_shorten(v) for v in value[:16]]
        return items if len(value) <= 16 else [*items[:8], f"... {len(value)} items"]
    return value
