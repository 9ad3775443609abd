"""Does the selection work? Fine-tune on it, on a random subset and on everything; compare.

:func:`compare` selects the top ``fraction`` of a datastore's pool for some target examples with
the selection engine (in-process: :class:`~gradstore.selection.featurizer.TargetFeaturizer` and
:class:`~gradstore.selection.engine.SelectionEngine`), then fine-tunes a fresh LoRA on the base
model the store was built with, once per arm and seed, and evaluates each model on held-out
records of the target task (:mod:`gradstore.indexer.finetune`):

* ``base``: the base model, not fine-tuned (evaluated once, a reference);
* ``less``: the selected records, in their original form, one fine-tuning per seed;
* ``random``: for each seed, ``random.Random(seed).sample`` of the pool, as many records as
  selected;
* ``full``: the whole pool, with ``full_epochs`` epochs and ``full_seeds`` (by default the first
  seed only: it is the expensive arm).

Each arm reports the mean and the sample standard deviation over its seeds of the held-out loss
(mean answer-token loss) and the exact-match accuracy of greedy generation, and every seed's
values. With ``family_field`` and ``target_family``, the selection's precision (the share of
selected records whose ``family_field`` is ``target_family``) is reported with the pool's base
rate, and the same share for each random subset.

:func:`run_comparison` is the part after selection, for a selection made elsewhere (the demo
selects through the REST service). ``gradstore eval`` is the command-line front end;
:func:`format_table` prints a result and :func:`to_json` serialises it.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ARMS = ("base", "less", "random", "full")
_TEMPLATES = {"gradstore-default": "default", "tokenizer": "tokenizer"}


@dataclass
class ArmResult:
    """One arm: its training set size, epochs, and per-seed held-out figures."""

    name: str
    examples: int  # training records (0 for the base model)
    epochs: int  # 0 for the base model
    seeds: list[int]  # empty for the base model (evaluated once)
    losses: list[float]
    accuracies: list[float]
    train_seconds: list[float] = field(default_factory=list)

    @property
    def loss_mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def loss_std(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name, "examples": self.examples, "epochs": self.epochs, "seeds": list(self.seeds),
            "loss_mean": self.loss_mean, "loss_std": self.loss_std,
            "accuracy_mean": self.accuracy_mean, "accuracy_std": self.accuracy_std,
            "losses": list(self.losses), "accuracies": list(self.accuracies),
            "train_seconds": list(self.train_seconds),
        }


@dataclass
class ComparisonResult:
    """Every arm's results, the selection and its precision (see the module docstring)."""

    arms: dict[str, ArmResult]  # in ARMS order, the arms that ran
    pool: int  # records in the pool
    selected: int  # records selected (and in each random subset)
    fraction: float | None
    heldout: int  # held-out records evaluated
    selected_ids: list[str]
    precision: float | None = None  # share of selected records of the target family
    base_rate: float | None = None  # share of the pool of the target family
    random_precision: list[float] = field(default_factory=list)  # the same share, per random subset
    family_field: str | None = None
    target_family: str | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "pool": self.pool, "selected": self.selected, "fraction": self.fraction, "heldout": self.heldout,
            "precision": self.precision, "base_rate": self.base_rate, "random_precision": self.random_precision,
            "family_field": self.family_field, "target_family": self.target_family,
            "arms": {name: arm.to_dict() for name, arm in self.arms.items()},
            "settings": self.settings, "seconds": self.seconds, "selected_ids": self.selected_ids,
        }


# ------------------------------------------------------------------------------------------------
# Running


def pool_records(store) -> list[dict]:
    """Every record of a datastore (a :class:`Datastore` or its folder), in row order, original form."""
    from gradstore.indexer.datastore import Datastore

    if not isinstance(store, Datastore):
        store = Datastore.open(store)
    table = store.examples(columns=["row", "record"])
    rows = table.column("row").to_pylist()
    texts = table.column("record").to_pylist()
    records: list[dict | None] = [None] * len(rows)
    for row, text in zip(rows, texts):
        records[row] = json.loads(text)
    return records


def store_model(store) -> dict:
    """What fine-tuning needs from a store's manifest: the base model and tokenizer folders, the
    chat format and the maximum length the store was built with."""
    from gradstore.indexer.datastore import Datastore

    manifest = store.manifest if isinstance(store, Datastore) else Datastore.open(store).manifest
    template = _TEMPLATES.get(manifest.tokenizer.get("template"), "auto")
    return {
        "model_dir": Path(manifest.model.path),
        "tokenizer_dir": Path(manifest.tokenizer.get("path") or manifest.model.path),
        "template": template,
        "max_length": int(manifest.tokenizer.get("max_length", 512)),
    }


def compare(store_path: str | Path, targets: Sequence[dict], heldout: Sequence[dict], *, fraction: float = 0.05,
            seeds: Sequence[int] = (0, 1, 2), include_full: bool = True, full_seeds: Sequence[int] | None = None,
            settings=None, full_epochs: int | None = 1, max_length: int | None = None,
            max_new_tokens: int = 32, eval_batch_size: int = 32, family_field: str | None = None,
            target_family: str | None = None, device: str = "auto", progress: bool = True,
            log: Callable[[str], None] = print) -> ComparisonResult:
    """Select the top ``fraction`` of the store for ``targets``, then :func:`run_comparison`.

    ``settings`` is a :class:`~gradstore.indexer.finetune.FinetuneSettings` (its ``max_length``
    and ``template`` are replaced by the store's unless ``max_length`` is given); ``full_epochs``
    (None: the same as the other arms) is the full corpus's number of epochs.
    """
    from gradstore.indexer.datastore import Datastore
    from gradstore.indexer.finetune import FinetuneSettings
    from gradstore.selection import SelectionEngine, SelectionOptions
    from gradstore.selection import TargetFeaturizer

    started = time.perf_counter()
    store = Datastore.open(store_path)
    engine = SelectionEngine(store)
    options = SelectionOptions(fraction=fraction)
    options.validate()
    log(f"selecting the top {fraction:.0%} of {store.num_examples:,} examples for {len(targets)} target example(s)")
    target_set = TargetFeaturizer(store, device=device).featurize(list(targets))
    selection = engine.select(target_set, options)
    pool = pool_records(store)
    selected = [pool[int(row)] for row in selection.rows]

    found = store_model(store)
    settings = settings or FinetuneSettings()
    settings = settings.replace(max_length=max_length or found["max_length"], template=found["template"])
    result = run_comparison(pool, selected, heldout, found["model_dir"], found["tokenizer_dir"], settings=settings,
                            seeds=seeds, include_full=include_full, full_seeds=full_seeds,
                            full_epochs=full_epochs, max_new_tokens=max_new_tokens,
                            eval_batch_size=eval_batch_size, family_field=family_field,
                            target_family=target_family, device=device, progress=progress, log=log)
    result.fraction = fraction
    result.seconds = time.perf_counter() - started
    return result


def run_comparison(pool: Sequence[dict], selected: Sequence[dict], heldout: Sequence[dict],
                   model_dir: str | Path, tokenizer_dir: str | Path | None = None, *, settings=None,
                   seeds: Sequence[int] = (0, 1, 2), include_full: bool = True,
                   full_seeds: Sequence[int] | None = None, full_epochs: int | None = 1,
                   max_new_tokens: int = 32, eval_batch_size: int = 32, family_field: str | None = None,
                   target_family: str | None = None, device: str = "auto", progress: bool = True,
                   log: Callable[[str], None] = print) -> ComparisonResult:
    """Fine-tune and evaluate every arm for an already made selection (see the module docstring).

    ``pool``: every record of the corpus; ``selected``: the selected records (a subset of the
    pool); ``heldout``: the target task's held-out records, with ``"answer"``.
    """
    from gradstore.indexer.errors import JobError
    from gradstore.indexer.finetune import FinetuneSettings, evaluate, finetune_lora
    from gradstore.indexer.model import load_base_model, load_tokenizer, resolve_device

    started = time.perf_counter()
    settings = settings or FinetuneSettings()
    settings.validate()
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise JobError(f"seeds={seeds!r}: expected distinct seeds, at least one")
    full_seeds = list(full_seeds) if full_seeds is not None else seeds[:1]
    if include_full and not full_seeds:
        raise JobError("full_seeds is empty: give at least one seed for the full corpus, or leave it out")
    if not selected or not pool or len(selected) > len(pool):
        raise JobError(f"{len(selected)} selected of {len(pool)} pool records: expected a non-empty selection "
                       "no larger than the pool")
    if not heldout:
        raise JobError("no held-out records to evaluate on")
    full_epochs = full_epochs or settings.epochs
    tokenizer_dir = tokenizer_dir or model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    torch_device = resolve_device(device)

    def measure(model, label: str) -> tuple[float, float]:
        result = evaluate(model, tokenizer, heldout, max_length=settings.max_length, batch_size=eval_batch_size,
                          max_new_tokens=max_new_tokens, template=settings.template, progress=progress,
                          desc=f"evaluating {label}")
        log(f"{label}: held-out loss {result.loss:.4f}, accuracy {result.accuracy:.1%} ({result.n} records)")
        return result.loss, result.accuracy

    def train(records: Sequence[dict], seed: int, epochs: int, label: str):
        began = time.perf_counter()
        model = finetune_lora(
            records, model_dir, tokenizer_dir, seed=seed, epochs=epochs, learning_rate=settings.learning_rate,
            lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, batch_size=settings.batch_size,
            max_length=settings.max_length, device=str(torch_device), progress=progress,
            lora_dropout=settings.lora_dropout, lora_targets=settings.lora_targets,
            warmup_ratio=settings.warmup_ratio, weight_decay=settings.weight_decay, template=settings.template,
            dtype=settings.dtype, desc=label, log=log)
        return model, time.perf_counter() - began

    arms: dict[str, ArmResult] = {}
    log(f"evaluating on {len(heldout)} held-out records; fine-tuning {len(selected)} selected, "
        f"{len(selected)} random ({len(seeds)} seed(s)){f', {len(pool)} full' if include_full else ''}")

    base = load_base_model(model_dir, settings.dtype, torch_device)
    loss, accuracy = measure(base, "base model")
    del base
    arms["base"] = ArmResult("base", 0, 0, [], [loss], [accuracy])

    subsets = {"less": {seed: list(selected) for seed in seeds}}
    random_positions = {seed: random.Random(seed).sample(range(len(pool)), len(selected)) for seed in seeds}
    subsets["random"] = {seed: [pool[i] for i in positions] for seed, positions in random_positions.items()}
    if include_full:
        subsets["full"] = {seed: list(pool) for seed in full_seeds}
    for name, by_seed in subsets.items():
        epochs = full_epochs if name == "full" else settings.epochs
        arm = ArmResult(name, len(next(iter(by_seed.values()))), epochs, [], [], [])
        for seed, records in by_seed.items():
            label = f"{name} seed {seed}"
            model, seconds = train(records, seed, epochs, label)
            loss, accuracy = measure(model, label)
            del model
            arm.seeds.append(seed)
            arm.losses.append(loss)
            arm.accuracies.append(accuracy)
            arm.train_seconds.append(seconds)
        arms[name] = arm

    result = ComparisonResult(
        arms=arms, pool=len(pool), selected=len(selected), fraction=None, heldout=len(heldout),
        selected_ids=[str(record.get("id", "")) for record in selected], family_field=family_field,
        target_family=target_family,
        settings={**settings.to_dict(), "full_epochs": full_epochs, "max_new_tokens": max_new_tokens,
                  "seeds": seeds, "full_seeds": full_seeds if include_full else [],
                  "model": str(model_dir), "tokenizer": str(tokenizer_dir)},
    )
    if family_field is not None and target_family is not None:
        result.precision = family_share(selected, family_field, target_family)
        result.base_rate = family_share(pool, family_field, target_family)
        result.random_precision = [family_share(subsets["random"][seed], family_field, target_family)
                                   for seed in seeds]
    result.seconds = time.perf_counter() - started
    return result


def family_share(records: Sequence[dict], family_field: str, target_family: str) -> float:
    """Share of ``records`` whose ``family_field`` equals ``target_family`` (compared as strings)."""
    if not records:
        return 0.0
    return sum(str(record.get(family_field)) == str(target_family) for record in records) / len(records)


# ------------------------------------------------------------------------------------------------
# Output

_LABELS = {"base": "base model", "less": "LESS", "random": "random", "full": "full corpus"}


def format_table(result: ComparisonResult) -> str:
    """A fixed-width table: one row per arm, then the selection's precision and every seed's values."""
    fraction = f" {result.fraction:.0%}" if result.fraction is not None else ""
    header = f"{'arm':<14}{'examples':>9}{'epochs':>8}{'seeds':>7}   {'held-out loss':<17}   {'accuracy':<17}"
    lines = [header, "-" * len(header)]
    for name, arm in result.arms.items():
        label = _LABELS[name] + (fraction if name in ("less", "random") else "")
        seeds = str(len(arm.seeds)) if arm.seeds else "-"
        loss = f"{arm.loss_mean:.4f}" + (f" ± {arm.loss_std:.4f}" if len(arm.losses) > 1 else "")
        accuracy = f"{arm.accuracy_mean:.1%}" + (f" ± {arm.accuracy_std:.1%}" if len(arm.accuracies) > 1 else "")
        epochs = str(arm.epochs) if arm.epochs else "-"
        lines.append(f"{label:<14}{arm.examples:>9,}{epochs:>8}{seeds:>7}   {loss:<17}   {accuracy:<17}")
    lines.append("")
    lines.append(f"held-out: {result.heldout} records; pool: {result.pool:,} records; "
                 f"selected: {result.selected:,}")
    if result.precision is not None:
        ratio = result.precision / result.base_rate if result.base_rate else float("inf")
        lines.append(f"selection precision ({result.family_field} = {result.target_family}): "
                     f"{result.precision:.1%} vs base rate {result.base_rate:.1%} ({ratio:.1f}x)")
        if result.random_precision:
            shares = ", ".join(f"{share:.1%}" for share in result.random_precision)
            lines.append(f"random subsets from the target family: {shares}")
    lines.append("per seed (seed: loss / accuracy):")
    for name, arm in result.arms.items():
        if arm.seeds:
            values = ", ".join(f"{seed}: {loss:.4f} / {accuracy:.1%}"
                               for seed, loss, accuracy in zip(arm.seeds, arm.losses, arm.accuracies))
            lines.append(f"  {_LABELS[name]:<12} {values}")
    return "\n".join(line.rstrip() for line in lines)


def to_json(result: ComparisonResult) -> str:
    """The result as a JSON document (means, standard deviations, per-seed values, settings)."""
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
