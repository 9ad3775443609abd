"""Reading Adam state from real checkpoint files: HF Trainer integer-keyed and name-keyed layouts."""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from gradstore.indexer.errors import OptimizerStateError
from gradstore.indexer.optimizer_state import (
    AdamParamState,
    canonical_param_name,
    convert_optimizer_file,
    find_optimizer_file,
    is_weight_decayed,
    load_optimizer_state,
)
from gradstore.indexer.tiny import build_model, build_tokenizer

# Library noise unrelated to what is tested: PEFT flags lora_bias on bias-less layers and 1-D
# lora_B biases when saving, transformers a deprecated attribute the Trainer itself reads.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
]

TEXTS = [f"example {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(32)]


# --------------------------------------------------------------------------------------------
# Fixtures: tiny PEFT LoRA models and real optimizer steps
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "gpt2": build_model("gpt2", tokenizer, root / "gpt2", hidden=32, layers=2, heads=2),
        "gpt2-wide": build_model("gpt2", tokenizer, root / "gpt2-wide", hidden=64, layers=2, heads=2),
        "llama": build_model("llama", tokenizer, root / "llama", hidden=32, layers=2, heads=2),
    }


def lora_model(model_dir: Path, kind: str, **lora_kwargs):
    """A PEFT LoRA model (r=4) on a saved tiny model."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "gpt2":
        config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, **lora_kwargs)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora_kwargs)
    return get_peft_model(base, config)


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def canonical_shapes(model) -> "OrderedDict[str, torch.Size]":
    return OrderedDict((canonical_param_name(name), p.shape) for name, p in trainable(model))


def hf_trainer_groups(model, decay_betas=(0.9, 0.999), no_decay_betas=(0.9, 0.999)):
    """Param groups built as transformers.Trainer.create_optimizer builds them."""
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    params = trainable(model)
    return [
        {"params": [p for n, p in params if n in decay_names], "weight_decay": 0.1,
         "betas": decay_betas},
        {"params": [p for n, p in params if n not in decay_names], "weight_decay": 0.0,
         "betas": no_decay_betas, "eps": 1e-6},
    ]


def train_steps(model, tokenizer, optimizer, steps: int = 3) -> None:
    """A few real optimizer steps on the LM loss."""
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()


def live_state(optimizer, model) -> dict[str, dict]:
    """The optimizer's in-memory state keyed by canonical name (ground truth for the file)."""
    return {canonical_param_name(name): optimizer.state[p] for name, p in trainable(model)}


def assert_matches_live(loaded: dict[str, AdamParamState], live: dict[str, dict]) -> None:
    assert list(loaded) == list(live)
    for name, state in loaded.items():
        torch.testing.assert_close(state.exp_avg, live[name]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(state.exp_avg_sq, live[name]["exp_avg_sq"], rtol=0, atol=0)
        assert state.exp_avg.dtype == torch.float32
        assert state.step == int(live[name]["step"])


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def test_canonical_param_name():
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    assert canonical_param_name(name) == "transformer.h.0.attn.c_attn.lora_A.weight"
    assert canonical_param_name("transformer.h.0.attn.c_attn.lora_A.weight") == \
        "transformer.h.0.attn.c_attn.lora_A.weight"
    assert canonical_param_name("base_model.model.model.embed_tokens.lora_embedding_A.default") == \
        "model.embed_tokens.lora_embedding_A"
    assert canonical_param_name("base_model.model.x.lora_B.mine.weight", adapter_name="mine") == \
        "x.lora_B.weight"
    # Another adapter's segment is kept: its parameters are not this adapter's.
    assert canonical_param_name("base_model.model.x.lora_B.other.weight") == "x.lora_B.other.weight"


def test_decay_rule_matches_transformers_trainer(model_dirs):
    model = lora_model(model_dirs["llama"], "llama", lora_bias=True)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    for name, _ in trainable(model):
        assert is_weight_decayed(canonical_param_name(name)) == (name in decay), name
    assert any(not is_weight_decayed(canonical_param_name(n)) for n, _ in trainable(model))


def test_adapter_name_containing_bias_takes_params_out_of_decay():
    # Trainer matches "bias" anywhere in the full PEFT name, adapter segment included.
    assert is_weight_decayed("x.lora_A.weight", adapter_name="default")
    assert not is_weight_decayed("x.lora_A.weight", adapter_name="bias_ft")


# --------------------------------------------------------------------------------------------
# HF Trainer integer-keyed optimizer.pt
# --------------------------------------------------------------------------------------------


def test_decay_and_no_decay_groups_map_ids_by_group(model_dirs, tokenizer, tmp_path):
    # lora_bias=True adds lora_B biases: no-decay params interleaved with decay params in
    # named_parameters() order, so ids are NOT in named_parameters() order.
    model = lora_model(model_dirs["gpt2"], "gpt2", lora_bias=True)
    groups = hf_trainer_groups(model, decay_betas=(0.9, 0.99), no_decay_betas=(0.8, 0.95))
    assert len(groups[1]["params"]) > 0 and len(groups[0]["params"]) > 0
    optimizer = torch.optim.AdamW(groups, lr=1e-2, eps=1e-8)
    train_steps(model, tokenizer, optimizer, steps=3)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    loaded = load_optimizer_state(tmp_path / "optimizer.pt", canonical_shapes(model))

    assert_matches_live(loaded, live_state(optimizer, model))
    bias = loaded["transformer.h.0.attn.c_attn.lora_B.bias"]
    weight = loaded["transformer.h.0.attn.c_attn.lora_A.weight"]
    assert (bias.beta1, bias.beta2, bias.eps) == (0.8, 0.95, 1e-6)
    assert (weight.beta1, weight.beta2, weight.eps) == (0.9, 0.99, 1e-8)
    assert weight.step == 3


def test_single_group_maps_ids_in_named_parameters_order(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["llama"], "llama")
    optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2, betas=(0.85, 0.98))
    train_steps(model, tokenizer, optimizer, steps=2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    loaded = load_optimizer_state(tmp_path, canonical_shapes(model))  # a checkpoint directory

    assert_matches_live(loaded, live_state(optimizer, model))
    assert {(s.beta1, s.beta2, s.step) for s in loaded.values()} == {(0.85, 0.98, 2)}


def test_param_names_stored_by_torch_are_used(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["llama"], "llama")
    named = list(reversed(trainable(model)))  # an order no size-based rule could guess
    optimizer = torch.optim.AdamW(named, lr=1e-2)
    train_steps(model, tokenizer, optimizer, steps=2)
    saved = optimizer.state_dict()
    assert "param_names" in saved["param_groups"][0]
    torch.save(saved, tmp_path / "optimizer.pt")

    loaded = load_optimizer_state(tmp_path / "optimizer.pt", canonical_shapes(model))

    assert_matches_live(loaded, live_state(optimizer, model))


def test_real_trainer_checkpoint(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["gpt2"], "gpt2", lora_bias=True)
    examples = [{"input_ids": ids, "labels": ids}
                for ids in (tokenizer(text)["input_ids"] for text in TEXTS[:8])]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, save_strategy="steps", save_steps=3,
        per_device_train_batch_size=1, learning_rate=1e-2, weight_decay=0.1, use_cpu=True,
        report_to=[], logging_strategy="no", disable_tqdm=True, adam_beta2=0.98,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert find_optimizer_file(checkpoint) == checkpoint / "optimizer.pt"

    loaded = load_optimizer_state(checkpoint, canonical_shapes(model))

    assert_matches_live(loaded, live_state(trainer.optimizer, model))
    assert {(s.beta1, s.beta2, s.step) for s in loaded.values()} == {(0.9, 0.98, 3)}


def test_group_sizes_that_fit_no_rule_are_reported(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["llama"], "llama")
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:5]},
                                   {"params": params[5:]}], lr=1e-2)
    train_steps(model, tokenizer, optimizer, steps=1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    with pytest.raises(OptimizerStateError) as error:
        load_optimizer_state(tmp_path / "optimizer.pt", canonical_shapes(model))
    message = str(error.value)
    assert f"sizes [3, 2, {len(params) - 5}]" in message
    assert f"one group of all {len(params)}" in message
    assert f"groups of sizes [{len(params)}, 0]" in message


# --------------------------------------------------------------------------------------------
# Name-keyed optimizer.bin
# --------------------------------------------------------------------------------------------


def fsdp_name(peft_name: str) -> str:
    """A PEFT name as FSDP (inside DDP-style ``module.``) would write it."""
    head, _, tail = peft_name.partition(".layers.")
    if not tail:
        return "module._fsdp_wrapped_module." + peft_name
    return f"module._fsdp_wrapped_module.{head}.layers.{tail.replace('.', '._fsdp_wrapped_module.', 1)}"


def test_name_keyed_with_fsdp_prefixes(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["llama"], "llama")
    optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2, betas=(0.8, 0.9),
                                  eps=1e-7)
    train_steps(model, tokenizer, optimizer, steps=3)
    saved = optimizer.state_dict()
    names = [fsdp_name(name) for name, _ in trainable(model)]
    assert "._fsdp_wrapped_module.self_attn" in names[0]
    name_keyed = {
        "state": {name: saved["state"][i] for i, name in enumerate(names)},
        "param_groups": [{**saved["param_groups"][0], "params": names}],
    }
    torch.save(name_keyed, tmp_path / "optimizer.bin")
    assert find_optimizer_file(tmp_path) == tmp_path / "optimizer.bin"

    loaded = load_optimizer_state(tmp_path, canonical_shapes(model))

    assert_matches_live(loaded, live_state(optimizer, model))
    assert {(s.beta1, s.beta2, s.eps, s.step) for s in loaded.values()} == {(0.8, 0.9, 1e-7, 3)}


@pytest.fixture
def name_keyed_file(model_dirs, tokenizer, tmp_path):
    """A name-keyed optimizer.bin after real AdamW steps, and the model it belongs to."""
    model = lora_model(model_dirs["llama"], "llama")
    optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2)
    train_steps(model, tokenizer, optimizer, steps=2)
    saved = optimizer.state_dict()
    names = [name for name, _ in trainable(model)]
    torch.save({"state": {name: saved["state"][i] for i, name in enumerate(names)},
                "param_groups": [{**saved["param_groups"][0], "params": names}]},
               tmp_path / "optimizer.bin")
    return tmp_path / "optimizer.bin", model


def test_missing_params_are_listed(name_keyed_file):
    path, model = name_keyed_file
    shapes = canonical_shapes(model)
    shapes["model.layers.0.mlp.up_proj.lora_A.weight"] = torch.Size([4, 32])

    with pytest.raises(OptimizerStateError, match=r"no optimizer state for 1 trainable LoRA "
                                                  r"parameter\(s\): model\.layers\.0\.mlp\.up_proj"):
        load_optimizer_state(path, shapes)


def test_extra_states_are_listed_at_most_ten(name_keyed_file):
    path, model = name_keyed_file
    shapes = canonical_shapes(model)  # 2 layers x (q, v) x (A, B) = 8 params
    kept = OrderedDict(list(shapes.items())[:1])

    with pytest.raises(OptimizerStateError) as error:
        load_optimizer_state(path, kept)
    message = str(error.value)
    assert f"{len(shapes) - 1} optimizer state(s) belong to no trainable LoRA parameter" in message
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert message.count("lora_") == len(shapes) - 1


def test_more_than_ten_extra_states_end_with_a_count(tmp_path):
    state = {f"layer.{i}.lora_A.default.weight": {"step": torch.tensor(1.0),
                                                  "exp_avg": torch.zeros(2),
                                                  "exp_avg_sq": torch.zeros(2)}
             for i in range(14)}
    torch.save({"state": state, "param_groups": [{"betas": (0.9, 0.999), "eps": 1e-8,
                                                  "params": list(state)}]},
               tmp_path / "optimizer.bin")

    with pytest.raises(OptimizerStateError) as error:
        load_optimizer_state(tmp_path, OrderedDict([("layer.0.lora_A.weight", torch.Size([2]))]))
    message = str(error.value)
    assert "13 optimizer state(s)" in message
    assert message.endswith("and 3 more")
    assert message.count("lora_A") == 10


def test_shape_mismatch_names_param_and_both_shapes(model_dirs, tokenizer, tmp_path):
    narrow = lora_model(model_dirs["gpt2"], "gpt2")
    optimizer = torch.optim.AdamW([p for _, p in trainable(narrow)], lr=1e-2)
    train_steps(narrow, tokenizer, optimizer, steps=1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    wide = lora_model(model_dirs["gpt2-wide"], "gpt2")  # same names, hidden 64 instead of 32

    with pytest.raises(OptimizerStateError) as error:
        load_optimizer_state(tmp_path / "optimizer.pt", canonical_shapes(wide))
    assert str(error.value).endswith(
        "transformer.h.0.attn.c_attn.lora_A.weight: exp_avg has shape (4, 32), "
        "parameter has shape (4, 64)"
    )


# --------------------------------------------------------------------------------------------
# Not Adam, missing or odd files
# --------------------------------------------------------------------------------------------


def test_sgd_momentum_state_is_not_adam(model_dirs, tokenizer, tmp_path):
    model = lora_model(model_dirs["gpt2"], "gpt2")
    optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=1e-2, momentum=0.9)
    train_steps(model, tokenizer, optimizer, steps=2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    with pytest.raises(OptimizerStateError,
                       match=re.escape("transformer.h.0.attn.c_attn.lora_A.weight: not an "
                                       "Adam-family optimizer state (no exp_avg / exp_avg_sq); "
                                       "its keys are ['momentum_buffer']")):
        load_optimizer_state(tmp_path / "optimizer.pt", canonical_shapes(model))


def test_missing_file_names_directory_and_files(tmp_path):
    assert find_optimizer_file(tmp_path) is None
    with pytest.raises(OptimizerStateError) as error:
        load_optimizer_state(tmp_path, OrderedDict())
    message = str(error.value)
    assert str(tmp_path) in message
    assert "optimizer.pt" in message and "optimizer.bin" in message

    with pytest.raises(OptimizerStateError, match="does not exist"):
        load_optimizer_state(tmp_path / "optimizer.pt", OrderedDict())


def test_optimizer_pt_is_preferred_over_bin(tmp_path):
    (tmp_path / "optimizer.bin").write_bytes(b"")
    assert find_optimizer_file(tmp_path) == tmp_path / "optimizer.bin"
    (tmp_path / "optimizer.pt").write_bytes(b"")
    assert find_optimizer_file(tmp_path) == tmp_path / "optimizer.pt"


def test_not_a_state_dict(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "optimizer.pt")
    with pytest.raises(OptimizerStateError, match=r"not an optimizer state dict .* found \['weights'\]"):
        load_optimizer_state(tmp_path, OrderedDict())


def _pickled_state(path):
    """A name-keyed state whose param group holds an object ``weights_only=True`` refuses."""
    state = {"x.lora_A.default.weight": {"step": 4, "exp_avg": torch.ones(3),
                                         "exp_avg_sq": torch.full((3,), 2.0)}}
    groups = [{"betas": (0.9, 0.999), "eps": 1e-8, "params": list(state),
               "extra": argparse.Namespace(note="not loadable with weights_only=True")}]
    torch.save({"state": state, "param_groups": groups}, path)
    return path


SHAPES = OrderedDict([("x.lora_A.weight", torch.Size([3]))])


def test_a_pickled_object_is_refused_naming_the_file_the_reason_and_the_fix(tmp_path):
    path = _pickled_state(tmp_path / "optimizer.bin")
    with pytest.raises(OptimizerStateError) as caught:
        load_optimizer_state(tmp_path, SHAPES)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: torch.load(weights_only=True) cannot read it")
    assert "argparse.Namespace" in message and "gradstore convert-optimizer IN OUT" in message


def test_trust_pickle_loads_it_with_a_warning(tmp_path):
    _pickled_state(tmp_path / "optimizer.bin")
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded = load_optimizer_state(tmp_path, SHAPES, trust_pickle=True)
    assert loaded["x.lora_A.weight"].step == 4
    torch.testing.assert_close(loaded["x.lora_A.weight"].exp_avg_sq, torch.full((3,), 2.0))


def test_a_payload_does_not_run_and_converting_keeps_the_state(tmp_path):
    from payloads import optimizer_with_payload

    marker = tmp_path / "marker"
    path = optimizer_with_payload(tmp_path / "optimizer.pt", marker)
    with pytest.raises(OptimizerStateError, match="refused.*GLOBAL exec"):
        load_optimizer_state(path, OrderedDict([("a", torch.Size([2]))]))
    assert not marker.exists()
    # The owner converts a file they trust: its code runs then (they chose to), the result is plain.
    converted = _pickled_state(tmp_path / "mine.bin")
    with pytest.warns(UserWarning, match="weights_only=False"):
        dropped = convert_optimizer_file(converted, tmp_path / "converted.pt")
    assert dropped == ["param_groups[0].extra"]
    loaded = load_optimizer_state(tmp_path / "converted.pt", SHAPES)
    torch.testing.assert_close(loaded["x.lora_A.weight"].exp_avg, torch.ones(3))


def test_an_unreadable_file_is_one_line_naming_it(tmp_path):
    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer.pt")
    data = (tmp_path / "optimizer.pt").read_bytes()
    (tmp_path / "optimizer.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(OptimizerStateError, match=r"optimizer.pt: cannot be read as a torch file"):
        load_optimizer_state(tmp_path, SHAPES)
