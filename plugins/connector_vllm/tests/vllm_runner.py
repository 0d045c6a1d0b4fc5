"""Runs one real vLLM instance (CPU) through a JSON job and writes JSON results.

Tests and the TTFT benchmark start this script in a fresh process, so each controls the
process's environment (``LMCACHE_CONFIG_FILE``) and vLLM's own child processes are cleaned up
with it. Usage: ``python vllm_runner.py JOB.json``. The job::

    {"model": "/tmp/x/model", "result_file": "/tmp/x/out.json",
     "connector": "module_path" | "plugin" | null,     # how to name our connector
     "enable_prefix_caching": false, "dtype": "float32",
     "steps": [{"prompt": [1, 2, ...], "max_tokens": 8},
               {"wait_for_file": "/tmp/x/go", "timeout": 60},  # let the test act in between
               {"touch": "/tmp/x/ready"}]}

Results: ``{"outputs": [{"token_ids": [...], "num_cached_tokens": n, "seconds": t}, ...]}``,
one per prompt step, ``seconds`` being the wall time of that ``generate`` call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

MODULE_PATH_CONFIG = {
    "kv_connector": "LMCacheConnectorV1",
    "kv_connector_module_path": "lmcache_connector_vllm.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}
PLUGIN_CONFIG = {
    "kv_connector": "LMCacheCoreConnectorV1",
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
    """
    import torch
    from safetensors.torch import save_file

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


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)  # polling a file the test creates, with a deadline


def run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    connector = job.get("connector")
    if connector == "module_path":
        kwargs["kv_transfer_config"] = MODULE_PATH_CONFIG
    elif connector == "plugin":
        kwargs["kv_transfer_config"] = PLUGIN_CONFIG
    elif connector is not None:
        raise ValueError(f"unknown connector mode {connector!r}")
    llm = LLM(
        model=job["model"],
        load_format=job.get("load_format", "auto"),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 4096),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 8192),
        enable_prefix_caching=job.get("enable_prefix_caching", False),
        seed=0,
        **kwargs,
    )
    outputs = []
    for step in job["steps"]:
        if "wait_for_file" in step:
            _wait_for_file(step["wait_for_file"], step.get("timeout", 120))
            continue
        if "touch" in step:
            Path(step["touch"]).touch()
            continue
        params = SamplingParams(
            temperature=0, max_tokens=step.get("max_tokens", 8), ignore_eos=True
        )
        start = time.perf_counter()
        (out,) = llm.generate([{"prompt_token_ids": step["prompt"]}], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        outputs.append(
            {
                "token_ids": list(out.outputs[0].token_ids),
                "num_cached_tokens": out.num_cached_tokens or 0,
                "seconds": seconds,
            }
        )
    return {"outputs": outputs}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run(job)
    Path(job["result_file"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
