"""Batched per-example LoRA gradients against batch-size-1 autograd on real tiny models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from gradstore.indexer.grads import Batch, PerExampleGradients
from gradstore.indexer.optimizer_state import canonical_param_name

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}


def lora_model(model_dir, kind):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the gradients of A are not zero.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], lora_dropout=0.1,
                        init_lora_weights=False)
    return get_peft_model(base, config)


def make_examples(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = -100  # a masked prompt, as in instruction data
        examples.append((ids.tolist(), labels.tolist()))
    return examples


def single_example_grads(model, ids, labels):
    """Reference: HF's own loss for one unpadded example, plain autograd."""
    model.eval()
    model.zero_grad()
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    out.loss.backward()
    grads = {canonical_param_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_per_example_grads_equal_batch_size_one(tiny_model_dirs, tiny_tokenizer, kind):
    model = lora_model(tiny_model_dirs[kind], kind)
    examples = make_examples([23, 7, 15, 40], len(tiny_tokenizer))
    computer = PerExampleGradients(model)
    losses, per_param = computer(Batch.collate(examples, pad_id=0, device="cpu"))
    batched = dict(per_param)
    assert set(batched) == set(computer.param_shapes)
    for row, (ids, labels) in enumerate(examples):
        ref_loss, ref = single_example_grads(model, ids, labels)
        assert losses[row].item() == pytest.approx(ref_loss, rel=1e-5)
        flat_ref = torch.cat([ref[name].flatten() for name in computer.param_shapes])
        flat_ours = torch.cat([batched[name][row].flatten() for name in computer.param_shapes])
        cosine = torch.nn.functional.cosine_similarity(flat_ref, flat_ours, dim=0).item()
        assert cosine >= 0.9999, (row, cosine)
        assert torch.allclose(flat_ours, flat_ref, rtol=1e-3, atol=1e-6)


def test_batch_composition_and_padding_do_not_change_an_example(tiny_model_dirs, tiny_tokenizer):
    model = lora_model(tiny_model_dirs["llama"], "llama")
    examples = make_examples([12, 30, 5], len(tiny_tokenizer), seed=3)
    computer = PerExampleGradients(model)
    _, alone = computer(Batch.collate(examples[:1], pad_id=0, device="cpu"))
    alone = dict(alone)
    # The same example padded to 30 tokens beside two others, and with a different pad id.
    _, together = computer(Batch.collate(examples[::-1], pad_id=7, device="cpu"))
    together = dict(together)
    for name, grads in alone.items():
        torch.testing.assert_close(together[name][2], grads[0], rtol=1e-4, atol=1e-7)


def test_example_without_labels_is_rejected(tiny_model_dirs, tiny_tokenizer):
    model = lora_model(tiny_model_dirs["gpt2"], "gpt2")
    examples = [([5, 6, 7], [-100, -100, 7]), ([5, 6, 7], [5, -100, -100])]
    with pytest.raises(ValueError, match="no label tokens"):
        PerExampleGradients(model)(Batch.collate(examples, pad_id=0, device="cpu"))


def test_grouped_gradients_are_the_per_parameter_ones_concatenated(tiny_model_dirs, tiny_tokenizer):
    model = lora_model(tiny_model_dirs["llama"], "llama")
    examples = make_examples([9, 14], len(tiny_tokenizer), seed=5)
    computer = PerExampleGradients(model)
    batch = Batch.collate(examples, pad_id=0, device="cpu")
    _, per_param = computer(batch)
    expected = dict(per_param)
    sizes = {name: torch.Size(shape).numel() for name, shape in computer.param_shapes.items()}
    limit = 3 * max(sizes.values())
    _, groups = computer.grouped(batch, max_elements=limit)
    seen = []
    for params, flat in groups:
        assert sum(sizes[name] for name, _ in params) <= limit and flat.shape == (2, sum(sizes[n] for n, _ in params))
        offset = 0
        for name, shape in params:
            torch.testing.assert_close(flat[:, offset:offset + sizes[name]].reshape(2, *shape), expected[name])
            offset += sizes[name]
        seen += [name for name, _ in params]
    assert seen == list(computer.param_shapes)
