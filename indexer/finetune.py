"""Fine-tuning a fresh LoRA on a list of records, and evaluating a model on held-out records.

This is what a selection is for: train on the selected examples, then measure the target task.
It is used by :mod:`gradstore.evaluate` (``gradstore eval`` and the demo) to compare training on
the LESS selection with training on a random subset of the same size and on the whole corpus.

Training
--------
:func:`finetune_lora` attaches a fresh LoRA to the base model and trains it with the warmup's own
loop (:func:`gradstore.indexer.warmup.train_lora`): AdamW, a linear schedule with warmup, one
optimizer step per batch, the loss of a batch the mean of its examples' mean answer-token losses.
Records are encoded by the project's :class:`~gradstore.indexer.formatting.Formatter` (chat
format, loss mask, truncation), exactly as the warmup and the indexer encode them. The model is
returned in memory; nothing is written.

Evaluation
----------
:func:`evaluate` measures two things on held-out records:

* ``loss``: the mean over records of each record's mean answer-token loss (the same per-example
  loss the training minimises), computed with dropout off;
* ``accuracy``: the share of records whose greedy generation, decoded and stripped, equals the
  record's ``"answer"`` field stripped (for a record without one: its last assistant message, or
  its completion). The prompt is :meth:`Formatter.prompt_text` (the rendering up to and including
  the assistant header), so generation sees the format training saw. Prompts are batched with
  left padding; generation stops at the tokenizer's EOS token or after ``max_new_tokens``
  tokens, and only the new tokens are decoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .corpus import Record, validate_record
from .errors import BadRecordError, JobError
from .formatting import TEMPLATE_CHOICES, Formatter
from .grads import Batch, per_example_losses
from .model import DTYPES, load_tokenizer, resolve_device
from .warmup import fresh_lora_model, schedule_steps, train_lora

FINETUNE_SOURCE = "finetune"


@dataclass(frozen=True)
class FinetuneSettings:
    """How a fresh LoRA is fine-tuned (see :func:`finetune_lora`); the defaults are LESS's
    fine-tuning settings (as the warmup's), meant for real models: a tiny model needs a far higher
    learning rate (the demo's settings are in ``gradstore/demo.py``)."""

    epochs: int = 4
    learning_rate: float = 2e-5
    lora_r: int = 128
    lora_alpha: float = 512.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] | str | None = None  # None: PEFT's default for the architecture
    batch_size: int = 8
    max_length: int = 2048
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    template: str = "auto"
    dtype: str = "fp32"

    def validate(self) -> None:
        """Raise :class:`JobError` naming the first setting that cannot work."""
        checks = [
            ("epochs", _positive_int(self.epochs)),
            ("learning_rate", _number(self.learning_rate) and self.learning_rate > 0),
            ("lora_r", _positive_int(self.lora_r)),
            ("lora_alpha", _number(self.lora_alpha) and self.lora_alpha > 0),
            ("lora_dropout", _number(self.lora_dropout) and 0 <= self.lora_dropout < 1),
            ("batch_size", _positive_int(self.batch_size)),
            ("max_length", _positive_int(self.max_length)),
            ("warmup_ratio", _number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1),
            ("weight_decay", _number(self.weight_decay) and self.weight_decay >= 0),
            ("template", self.template in TEMPLATE_CHOICES),
            ("dtype", self.dtype in DTYPES),
        ]
        for name, ok in checks:
            if not ok:
                raise JobError(f"fine-tuning setting {name}={getattr(self, name)!r} is not valid")

    def replace(self, **changes) -> "FinetuneSettings":
        return FinetuneSettings(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        values = asdict(self)
        if isinstance(self.lora_targets, tuple):
            values["lora_targets"] = list(self.lora_targets)
        return values


@dataclass
class EvalResult:
    """A model's held-out loss and exact-match accuracy (see the module docstring)."""

    loss: float
    accuracy: float
    n: int
    losses: list[float] = field(default_factory=list, repr=False)  # per record, in input order
    predictions: list[str] = field(default_factory=list, repr=False)  # decoded, stripped, in input order


def to_records(records: Sequence[dict | Record], what: str = "record") -> list[Record]:
    """Corpus records (dicts in the corpus format, or :class:`Record`) as validated :class:`Record`s."""
    out = []
    for index, record in enumerate(records):
        if isinstance(record, Record):
            out.append(record)
            continue
        location = f"{what} {index}"
        shape = validate_record(record, location)
        out.append(Record(id=str(record.get("id", index)), source=FINETUNE_SOURCE, location=location,
                          record=record, shape=shape))
    return out


def finetune_lora(records: Sequence[dict | Record], model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  *, seed: int = 0, epochs: int = 4, learning_rate: float = 2e-5, lora_r: int = 128,
                  lora_alpha: float = 512.0, batch_size: int = 8, max_length: int = 2048, device: str = "auto",
                  progress: bool = True, lora_dropout: float = 0.1,
                  lora_targets: tuple[str, ...] | str | None = None, warmup_ratio: float = 0.03,
                  weight_decay: float = 0.0, template: str = "auto", dtype: str = "fp32",
                  desc: str = "fine-tuning", log: Callable[[str], None] = lambda _: None):
    """A fresh LoRA on the model in ``model_dir``, trained on ``records``; the PEFT model, in memory.

    ``records`` are corpus records (chat, prompt/completion or text). The settings are those of
    :class:`FinetuneSettings` (``lora_targets="all-linear"`` adapts every linear map).

    ``seed`` initialises the LoRA and shuffles the examples, so the same seed, records and settings
    give the same weights (on CPU). The model is returned in eval mode.
    """
    settings = FinetuneSettings(epochs=epochs, learning_rate=learning_rate, lora_r=lora_r, lora_alpha=lora_alpha,
                                lora_dropout=lora_dropout, lora_targets=lora_targets, batch_size=batch_size,
                                max_length=max_length, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                                template=template, dtype=dtype)
    settings.validate()
    if not records:
        raise JobError("no records to fine-tune on")
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    formatter = _formatter(tokenizer, max_length, template)
    examples = []
    for record in to_records(records):
        encoded = formatter.encode(record)
        examples.append((encoded.input_ids, encoded.labels))
    steps_per_epoch = schedule_steps(len(examples), batch_size, epochs, warmup_ratio)[0]
    log(f"{desc}: {len(examples):,} examples, {epochs} epoch(s) of {steps_per_epoch} step(s), lr {learning_rate:g}, "
        f"LoRA r={lora_r} alpha={lora_alpha:g}, seed {seed}")
    model = fresh_lora_model(model_dir, dtype=dtype, device=torch_device, r=lora_r, alpha=lora_alpha,
                             dropout=lora_dropout, targets=lora_targets, seed=seed)
    run = train_lora(model, examples, pad_id=tokenizer.pad_token_id, device=torch_device, epochs=epochs,
                     learning_rate=learning_rate, batch_size=batch_size, seed=seed, warmup_ratio=warmup_ratio,
                     weight_decay=weight_decay, progress=progress, desc=desc)
    log(f"{desc}: train loss per epoch {', '.join(f'{loss:.4f}' for loss in run.losses)}")
    return model.eval()


@torch.inference_mode()
def evaluate(model, tokenizer, heldout_records: Sequence[dict | Record], *, max_length: int = 2048,
             batch_size: int = 32, max_new_tokens: int = 32, template: str = "auto",
             progress: bool = False, desc: str = "evaluating") -> EvalResult:
    """Held-out answer loss and greedy exact-match accuracy of ``model`` (see the module docstring).

    ``model`` is any causal LM (a plain Hugging Face model or a PEFT model); ``tokenizer`` the one
    it was trained with. ``max_length`` cuts each record for the loss, as in training.
    """
    records = to_records(heldout_records, "held-out record")
    if not records:
        raise JobError("no held-out records to evaluate on")
    if not _positive_int(batch_size) or not _positive_int(max_new_tokens):
        raise JobError(f"batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must be positive integers")
    formatter = _formatter(tokenizer, max_length, template)
    device = next(model.parameters()).device
    model.eval()
    batches = math.ceil(len(records) / batch_size)
    bar = _bar(2 * batches, desc, progress)
    try:
        # Loss: the per-example mean answer-token loss, right padding, as in training.
        encoded = [formatter.encode(record) for record in records]
        losses: list[float] = []
        for start in range(0, len(records), batch_size):
            chunk = encoded[start:start + batch_size]
            batch = Batch.collate([(e.input_ids, e.labels) for e in chunk], tokenizer.pad_token_id, device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            losses += per_example_losses(logits, batch.labels).tolist()
            bar.update(1)

        # Accuracy: greedy generation from the prompt, left padding.
        prompts = [formatter.prompt_text(record) for record in records]
        answers = [_expected_answer(record) for record in records]
        predictions: list[str] = []
        for start in range(0, len(records), batch_size):
            predictions += _generate(model, tokenizer, prompts[start:start + batch_size], max_new_tokens, device)
            bar.update(1)
    finally:
        bar.close()
    correct = sum(prediction == answer for prediction, answer in zip(predictions, answers))
    return EvalResult(loss=sum(losses) / len(losses), accuracy=correct / len(records), n=len(records),
                      losses=losses, predictions=predictions)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batch), decoded up to the first EOS, stripped."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        inputs = tokenizer(prompts, add_special_tokens=False, split_special_tokens=False, padding=True,
                           return_tensors="pt")
    finally:
        tokenizer.padding_side = previous_side
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    texts = []
    for tokens in new_tokens:
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


def _expected_answer(record: Record) -> str:
    data = record.record
    if isinstance(data.get("answer"), str):
        return data["answer"].strip()
    if record.shape == "messages":
        assistant = [m["content"] for m in data["messages"] if m.get("role") == "assistant"]
        if assistant:
            return assistant[-1].strip()
    if record.shape == "prompt_completion":
        return str(data.get("completion") or "").strip()
    raise BadRecordError(record.location, "the record has no 'answer' field and no assistant message or "
                                          "completion to compare a generation with")


def _formatter(tokenizer, max_length: int, template: str) -> Formatter:
    try:
        return Formatter(tokenizer, max_length, template)
    except ValueError as exc:
        raise JobError(str(exc)) from exc


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=not enabled)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
