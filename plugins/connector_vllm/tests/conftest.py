"""Fixtures for the vLLM connector tests (helpers live in vllm_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_runner import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 256, 4 heads, 2 KV heads) with random, well-scaled weights."""
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def llama3_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with Llama 3's vocabulary (LMCache's documented prompt uses its token ids)."""
    return write_tiny_llama(tmp_path_factory.mktemp("model3") / "tiny-llama3", vocab=128256)
