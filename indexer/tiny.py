"""Tiny models and tokenizers built locally, for tests, the demo and benchmarks.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on the given texts in
well under a second, and the models are randomly initialised from in-code GPT-2 and Llama configs.
Both are saved with ``save_pretrained`` so every other part of gradstore loads them from a local
path exactly as it would load a real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, AutoModelForCausalLM

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (every byte is representable)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def model_config(kind: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 max_positions: int = 512, intermediate: int | None = None):
    """An in-code config for a small ``gpt2`` or ``llama`` causal LM."""
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
            n_head=heads, n_inner=intermediate, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            attn_implementation="eager",
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max_positions, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            attn_implementation="eager",
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: expected 'gpt2' or 'llama'")


def build_model(kind: str, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, *, seed: int = 0,
                **config_kwargs) -> Path:
    """Build a randomly initialised ``kind`` model, save it with ``tokenizer`` to ``out_dir``."""
    torch.manual_seed(seed)
    config = model_config(kind, len(tokenizer), **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
