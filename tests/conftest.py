"""Shared fixtures: a tiny tokenizer and tiny GPT-2 / Llama models built locally (no hub)."""

from __future__ import annotations

import pytest

CORPUS_TEXTS = [
    "add 12 and 30 to get 42",
    "reverse the word cat to get tac",
    "the capital of france is paris",
    "convert 3 km to meters: 3000 m",
    "<|user|>\n<|assistant|>\n<|system|>\n",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gradstore.indexer.tiny import build_tokenizer

    return build_tokenizer(CORPUS_TEXTS, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """``{"gpt2": path, "llama": path}``: tiny models saved with their tokenizer."""
    from gradstore.indexer.tiny import build_model

    root = tmp_path_factory.mktemp("models")
    return {kind: build_model(kind, tiny_tokenizer, root / kind, seed=1) for kind in ("gpt2", "llama")}
