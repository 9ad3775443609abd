"""LESS warmup training: a short LoRA run on a random fraction of the corpus, one checkpoint per epoch.

Step one of LESS trains a fresh LoRA on a small random sample of the training corpus (5 % by
default) for a few epochs and keeps one checkpoint at the end of every epoch. The indexer then
computes Adam-preconditioned per-example gradients at each checkpoint, weighting each one by the
average learning rate of its epoch. This module writes exactly what the indexer reads::

    OUT/
    ├── epoch-1/
    │   ├── adapter_config.json, adapter_model.safetensors    (PEFT save_pretrained)
    │   ├── optimizer.pt                                      (AdamW state_dict, integer-keyed;
    │   │                                                      optimizer.bin, name-keyed, with
    │   │                                                      optimizer_format="bin")
    │   └── gradstore_checkpoint.json                         {"epoch", "global_step",
    │                                                          "average_learning_rate", "train_loss"}
    ├── epoch-2/ ...
    ├── tokenizer files                                       (the tokenizer used, saved as is)
    └── warmup_run.json                                       the run: checkpoints, their learning
                                                              rates, the config, the example ids

Training
--------
* The sample is ``max(1, floor(fraction * N))`` records drawn with ``random.Random(seed)``, kept in
  corpus order; each is encoded with the project's :class:`~gradstore.indexer.formatting.Formatter`
  (same chat format, loss mask and truncation as the indexer).
* A fresh LoRA (``r``, ``alpha``, ``dropout``, target modules; PEFT's default targets for the
  architecture when none are given) is attached after ``torch.manual_seed(seed)``, and the model
  is trained in train mode (dropout on), as HF Trainer does.
* AdamW over the trainable LoRA parameters in one param group, with a linear schedule: warmup
  over ``ceil(warmup_ratio * total_steps)`` steps, then linear decay to zero
  (``transformers.get_linear_schedule_with_warmup``). One optimizer step per batch of
  ``batch_size`` examples, the last batch of an epoch possibly smaller; no gradient clipping.
* Examples are shuffled every epoch with a generator seeded by ``seed``, so the same seed, data
  and settings give the same adapter weights (on CPU; CUDA kernels may differ in the last bits).

The loss of a batch is the **mean over its examples of each example's mean token loss**
(:func:`~gradstore.indexer.grads.per_example_losses`), not HF's mean over all label tokens of the
batch. Every example then weighs the same however long its answer is, which is how the indexer
defines one example's loss and gradient, so the warmup optimises the same per-example objective
whose gradients are later compared. (LESS trained with HF's token-level mean; the two differ only
in how long and short examples are weighted within a batch.)

The loop itself is :func:`train_lora` (with :func:`fresh_lora_model`), which
:mod:`gradstore.indexer.finetune` reuses, so warmup and fine-tuning train in exactly the same way;
only what happens at the end of an epoch (here: saving a checkpoint) differs.

The learning rate recorded for an epoch is the mean of the learning rates actually used by its
optimizer steps (the scheduler's value at the time of each ``optimizer.step()``, so the first
step of a run with warmup uses 0).

Everything is written to a temporary folder beside ``out`` and published at the end as datastores
are (:func:`gradstore.datastore.publish_folder`: every file fsynced, one rename), so ``out`` is
either absent or a complete run; an existing ``out`` is only replaced with ``overwrite=True``, and
only when it is a warmup run or an empty folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradstore.datastore import publish_folder

from .checkpoints import GRADSTORE_CHECKPOINT_INFO, CheckpointSpec
from .corpus import CorpusSource, read_corpus
from .errors import CheckpointError, JobError, ModelError
from .formatting import TEMPLATE_CHOICES, Formatter
from .grads import Batch, per_example_losses
from .model import DTYPES, _quiet_peft, load_base_model, load_tokenizer, resolve_device

RUN_MANIFEST = "warmup_run.json"
RUN_FORMAT = "gradstore-warmup-run"
RUN_VERSION = 1
# Both layouts the indexer reads (gradstore.indexer.optimizer_state): HF Trainer's integer-keyed
# optimizer.pt and the name-keyed optimizer.bin of accelerate / FSDP full state dicts.
OPTIMIZER_FILES = {"pt": "optimizer.pt", "bin": "optimizer.bin"}
CHECKPOINT_PREFIX = "epoch-"


@dataclass
class WarmupConfig:
    """Everything a warmup run needs; the defaults are LESS's warmup settings."""

    corpus: list[CorpusSource]
    model: Path
    out: Path
    tokenizer: Path | None = None  # default: the model folder's tokenizer
    fraction: float = 0.05  # share of the corpus records to train on, in (0, 1]
    seed: int = 0  # sampling, LoRA initialisation, dropout and shuffling
    epochs: int = 4  # one checkpoint per epoch
    learning_rate: float = 2e-5  # peak learning rate
    warmup_ratio: float = 0.03  # share of all steps spent warming up, in [0, 1)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lora_r: int = 128
    lora_alpha: float = 512
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] | None = None  # None: PEFT's default for the architecture
    batch_size: int = 8  # examples per optimizer step
    max_length: int = 2048  # tokens per example, longer ones are cut from the right
    template: str = "auto"  # chat format, see gradstore.indexer.formatting
    dtype: str = "fp32"  # base model weights: fp32, bf16 or fp16
    device: str = "auto"
    progress: bool = True  # a tqdm bar per epoch
    overwrite: bool = False  # replace an existing out
    optimizer_format: str = "pt"  # "pt": HF Trainer's integer-keyed optimizer.pt; "bin": name-keyed optimizer.bin

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.out = Path(self.out)
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
        if self.lora_targets is not None and not isinstance(self.lora_targets, str):
            self.lora_targets = tuple(self.lora_targets)

    def validate(self) -> None:
        """Raise :class:`JobError` naming the first setting that cannot work."""
        if not self.corpus:
            raise JobError("no corpus sources given: name at least one corpus file or folder")
        _check_number("fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        if self.optimizer_format not in OPTIMIZER_FILES:
            raise JobError(f"optimizer_format={self.optimizer_format!r}: expected one of {', '.join(OPTIMIZER_FILES)}")
        _check_integer("epochs", self.epochs, minimum=1)
        _check_integer("seed", self.seed, minimum=None)
        _check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise JobError(f"betas={self.betas!r}: expected two numbers (beta1, beta2)")
        for index, beta in enumerate(self.betas, start=1):
            _check_number(f"beta{index}", beta, low=0.0, high=1.0, high_open=True)
        _check_number("eps", self.eps, low=0.0, low_open=True)
        _check_integer("lora_r", self.lora_r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        _check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str) or not self.lora_targets or not all(
                    isinstance(t, str) and t for t in self.lora_targets):
                raise JobError(f"lora_targets={self.lora_targets!r}: expected a non-empty list of module "
                               "names (e.g. q_proj, v_proj), or None for PEFT's default")
        _check_integer("batch_size", self.batch_size, minimum=1)
        _check_integer("max_length", self.max_length, minimum=1)
        if self.template not in TEMPLATE_CHOICES:
            raise JobError(f"template={self.template!r}: expected one of {', '.join(TEMPLATE_CHOICES)}")
        if self.dtype not in DTYPES:
            raise JobError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if os.path.lexists(self.out) and not self.overwrite:
            raise JobError(f"{self.out} already exists; pass --overwrite to replace it")

    def to_dict(self) -> dict:
        """JSON-able copy of the settings, for the run manifest."""
        return {
            "corpus": [{"name": s.name, "path": str(s.path)} for s in self.corpus],
            "model": str(self.model),
            "tokenizer": str(self.tokenizer) if self.tokenizer is not None else None,
            "fraction": self.fraction,
            "seed": self.seed,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "warmup_ratio": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "betas": [float(b) for b in self.betas],
            "eps": self.eps,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_targets": list(self.lora_targets) if self.lora_targets is not None else None,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "template": self.template,
            "dtype": self.dtype,
            "device": self.device,
        }


@dataclass
class WarmupResult:
    """What a finished run wrote: one checkpoint per epoch, in epoch order."""

    out: Path
    checkpoints: list[Path]
    average_learning_rates: list[float]
    losses: list[float]  # mean training loss per epoch (per-example, dropout on)
    num_examples: int
    steps_per_epoch: int = 0
    seconds: float = 0.0
    example_ids: list[str] = field(default_factory=list)

    def checkpoint_specs(self) -> list[CheckpointSpec]:
        """The checkpoints as the indexer takes them (weights read from each checkpoint)."""
        return [CheckpointSpec(name=path.name, path=path) for path in self.checkpoints]


# ------------------------------------------------------------------------------------------------
# Validation helpers


def _check_integer(name: str, value, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{name}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise JobError(f"{name}={value!r}: must be at least {minimum}")


def _check_number(name: str, value, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobError(f"{name}={value!r}: expected a finite number")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
        raise JobError(f"{name}={value!r}: must be in {interval}")


# ------------------------------------------------------------------------------------------------
# The run


def sample_indices(num_records: int, fraction: float, seed: int) -> list[int]:
    """Corpus positions of the ``max(1, floor(fraction * num_records))`` sampled records, sorted."""
    count = min(num_records, max(1, math.floor(fraction * num_records)))
    return sorted(random.Random(seed).sample(range(num_records), count))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps of the linear schedule: ``ceil(warmup_ratio * total_steps)``."""
    return math.ceil(warmup_ratio * total_steps)


def run_warmup(config: WarmupConfig, log: Callable[[str], None] = print) -> WarmupResult:
    """Train the warmup LoRA and write one checkpoint per epoch to ``config.out`` (see the module)."""
    config.validate()
    started = time.perf_counter()
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    try:
        formatter = Formatter(tokenizer, config.max_length, config.template)
    except ValueError as exc:
        raise JobError(str(exc)) from exc

    corpus = read_corpus(config.corpus)
    if not corpus.records:
        raise JobError("the corpus has no records to train on")
    indices = sample_indices(len(corpus.records), config.fraction, config.seed)
    records = [corpus.records[i] for i in indices]
    encoded = [formatter.encode(record) for record in records]
    examples = [(e.input_ids, e.labels) for e in encoded]
    steps_per_epoch, total_steps, num_warmup = schedule_steps(len(examples), config.batch_size, config.epochs,
                                                              config.warmup_ratio)
    log(f"warmup: {len(examples):,} of {len(corpus.records):,} records, {config.epochs} epoch(s) of "
        f"{steps_per_epoch} step(s) at batch size {config.batch_size} ({num_warmup} warmup step(s)), "
        f"on {device}")

    model = fresh_lora_model(config.model, dtype=config.dtype, device=device, r=config.lora_r,
                             alpha=config.lora_alpha, dropout=config.lora_dropout, targets=config.lora_targets,
                             seed=config.seed)
    log(f"LoRA r={config.lora_r} alpha={config.lora_alpha}: {_describe_trainable(model)}")

    out = config.out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        def save(epoch: int, optimizer: torch.optim.Optimizer, info: dict) -> None:
            _save_checkpoint(work / f"{CHECKPOINT_PREFIX}{epoch}", model, optimizer, info, config.optimizer_format)
            log(f"epoch {epoch}/{config.epochs}: train loss {info['train_loss']:.4f}, "
                f"average learning rate {info['average_learning_rate']:.4g}, step {info['global_step']}")

        training = train_lora(
            model, examples, pad_id=tokenizer.pad_token_id, device=device, epochs=config.epochs,
            learning_rate=config.learning_rate, batch_size=config.batch_size, seed=config.seed,
            warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay, betas=tuple(config.betas),
            eps=config.eps, progress=config.progress, desc="warmup", on_epoch_end=save,
        )
        average_rates, losses = training.average_learning_rates, training.losses

        tokenizer.save_pretrained(str(work))
        names = [f"{CHECKPOINT_PREFIX}{epoch}" for epoch in range(1, config.epochs + 1)]
        manifest = {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "checkpoints": names,
            "average_learning_rates": average_rates,
            "losses": losses,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": num_warmup,
            "config": config.to_dict(),
            "formatting": formatter.describe(),
            "num_examples": len(examples),
            "num_corpus_records": len(corpus.records),
            "example_ids": [record.id for record in records],
        }
        (work / RUN_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        publish_folder(work, out, config.overwrite, lambda path: (path / RUN_MANIFEST).exists(), "gradstore warmup run")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    seconds = time.perf_counter() - started
    log(f"wrote {len(names)} checkpoint(s) to {out} in {seconds:,.1f} s")
    return WarmupResult(
        out=out,
        checkpoints=[out / name for name in names],
        average_learning_rates=average_rates,
        losses=losses,
        num_examples=len(examples),
        steps_per_epoch=steps_per_epoch,
        seconds=seconds,
        example_ids=[record.id for record in records],
    )


# ------------------------------------------------------------------------------------------------
# The LoRA training loop, shared with fine-tuning (gradstore.indexer.finetune)


@dataclass
class TrainingRun:
    """What :func:`train_lora` did: the schedule's step counts and, per epoch, the mean training
    loss (per-example, dropout on) and the mean learning rate of its optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    average_learning_rates: list[float]
    losses: list[float]


def schedule_steps(num_examples: int, batch_size: int, epochs: int, warmup_ratio: float) -> tuple[int, int, int]:
    """``(steps per epoch, total steps, warmup steps)`` of a run over ``num_examples`` examples."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    total_steps = steps_per_epoch * epochs
    return steps_per_epoch, total_steps, warmup_steps(total_steps, warmup_ratio)


def fresh_lora_model(model_path: str | Path, *, dtype: str = "fp32", device: torch.device | str = "cpu",
                     r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                     targets: tuple[str, ...] | list[str] | str | None = None, seed: int = 0):
    """The base model at ``model_path`` with a freshly initialised, trainable LoRA.

    ``targets``: module names, ``"all-linear"``, or None for PEFT's default for the architecture.
    The LoRA weights are initialised after ``torch.manual_seed(seed)``.
    """
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model_path, dtype, torch.device(device))
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    try:
        with _quiet_peft():
            model = get_peft_model(base, lora)
    except ValueError as exc:
        raise ModelError(f"cannot attach LoRA to {model_path}: {exc}") from exc
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"the LoRA on {model_path} has no trainable parameters; check lora_targets")
    return model


def train_lora(model, examples: list[tuple], *, pad_id: int, device: torch.device | str, epochs: int,
               learning_rate: float, batch_size: int, seed: int, warmup_ratio: float = 0.03,
               weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               progress: bool = True, desc: str = "training",
               on_epoch_end: Callable[[int, torch.optim.Optimizer, dict], None] | None = None) -> TrainingRun:
    """Train the trainable (LoRA) parameters of ``model`` on ``examples`` (see the module docstring).

    ``examples`` are ``(input_ids, labels)`` pairs as :meth:`Formatter.encode` gives them. AdamW
    over the trainable parameters, a linear schedule with ``ceil(warmup_ratio * total_steps)``
    warmup steps, one optimizer step per batch of ``batch_size`` examples shuffled every epoch by a
    generator seeded with ``seed``, and the loss of a batch the mean of its examples' mean token
    losses. After every epoch ``on_epoch_end(epoch, optimizer, info)`` is called with ``info`` =
    ``{"epoch", "global_step", "average_learning_rate", "train_loss"}``. The model is left in
    train mode.
    """
    if not examples:
        raise JobError("no examples to train on")
    steps_per_epoch, total_steps, num_warmup = schedule_steps(len(examples), batch_size, epochs, warmup_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=tuple(betas), eps=eps,
                                  weight_decay=weight_decay)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup, total_steps)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    global_step = 0
    average_rates, losses = [], []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(examples), generator=shuffle).tolist()
        rates, loss_sum = [], 0.0
        with _EpochBar(f"{desc} epoch {epoch}/{epochs}", steps_per_epoch, progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = Batch.collate([examples[r] for r in rows], pad_id, device)
                lr = float(optimizer.param_groups[0]["lr"])  # what this step uses
                loss = _batch_loss(model, batch)
                if not torch.isfinite(loss):
                    raise JobError(f"epoch {epoch}, step {global_step + 1}: the training loss is "
                                   f"{loss.item()}; lower the learning rate or use dtype fp32")
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                rates.append(lr)
                loss_sum += loss.item() * len(rows)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", refresh=False)
        average_rates.append(sum(rates) / len(rates))
        losses.append(loss_sum / len(examples))
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, {
                "epoch": epoch,
                "global_step": global_step,
                "average_learning_rate": average_rates[-1],
                "train_loss": losses[-1],
            })
    return TrainingRun(steps_per_epoch, total_steps, num_warmup, average_rates, losses)


def _describe_trainable(model) -> str:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return f"{sum(p.numel() for p in trainable):,} trainable parameters in {len(trainable)} tensors"


def _batch_loss(model, batch: Batch) -> torch.Tensor:
    """Mean over the batch of each example's mean token loss (see the module docstring)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return per_example_losses(logits, batch.labels).mean()


def _save_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer, info: dict,
                     optimizer_format: str = "pt") -> None:
    path.mkdir(parents=True)
    model.save_pretrained(str(path))
    state = optimizer.state_dict()
    if optimizer_format == "bin":
        state = _name_keyed(state, model)
    torch.save(state, path / OPTIMIZER_FILES[optimizer_format])
    (path / GRADSTORE_CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _name_keyed(state: dict, model) -> dict:
    """An integer-keyed state dict (one group over the trainable parameters in
    ``named_parameters()`` order, as :func:`train_lora` builds it) keyed by parameter names, with
    every group listing its names: the layout of accelerate / FSDP full optimizer state dicts."""
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    by_id = {}
    for group in state["param_groups"]:
        for param_id in group["params"]:
            by_id[param_id] = names[param_id]
    return {"state": {by_id[param_id]: value for param_id, value in state["state"].items()},
            "param_groups": [{**{k: v for k, v in group.items() if k != "param_names"},
                              "params": [by_id[param_id] for param_id in group["params"]]}
                             for group in state["param_groups"]]}



class _EpochBar:
    """A tqdm bar over one epoch's steps, or a stand-in that does nothing."""

    def __init__(self, desc: str, steps: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False


# ------------------------------------------------------------------------------------------------
# Reading a run


def read_run_manifest(run_dir: Path) -> list[CheckpointSpec]:
    """The checkpoints of a warmup run, in epoch order, as the indexer takes them.

    Paths are resolved relative to ``run_dir``; ``weight`` is None, so the indexer weighs each
    checkpoint by the average learning rate recorded in it.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {RUN_MANIFEST}; is this a gradstore warmup run?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the warmup run manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a gradstore warmup run manifest (format is not {RUN_FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > RUN_VERSION:
        raise CheckpointError(f"{path}: warmup run manifest version {version!r} is not supported "
                              f"(this gradstore reads up to version {RUN_VERSION})")
    names = manifest.get("checkpoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"{path}: 'checkpoints' must be a non-empty list of folder names")
    specs = []
    for name in names:
        checkpoint = run_dir / name
        if not checkpoint.is_dir():
            raise CheckpointError(f"{path}: checkpoint {name} is listed but {checkpoint} is not a directory")
        specs.append(CheckpointSpec(name=name, path=checkpoint, weight=None))
    return specs
