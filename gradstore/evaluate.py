"""Which selection works? Fine-tune on each strategy's selection, on everything; compare.

:func:`compare` selects ``fraction`` of a datastore's pool with each of several strategies
(in-process: :class:`~gradstore.selection.featurizer.TargetFeaturizer` and
:class:`~gradstore.selection.engine.SelectionEngine`, strategies from the registry), then
fine-tunes a fresh LoRA on the base model the store was built with, once per arm and seed, and
evaluates each model on held-out records of the target task (:mod:`gradstore.indexer.finetune`):

* ``base``: the base model, not fine-tuned (evaluated once, a reference);
* one arm per strategy (``less``, ``rds``, ``quality:score=effective_rank``, ``random``, ...),
  labelled by :func:`~gradstore.selection.strategies.strategy_label`: its selection, one
  fine-tuning per seed. A strategy with a ``seed`` option that is not given (``random``) selects
  once per fine-tuning seed, with that seed; the others select once;
* ``full``: the whole pool, with ``full_epochs`` epochs and ``full_seeds`` (by default the first
  seed only: it is the expensive arm).

Each arm reports the mean and the sample standard deviation over its seeds of the held-out loss
(mean answer-token loss) and the exact-match accuracy of greedy generation, and every seed's
values. With ``family_field`` and ``target_family``, each selection's precision (the share of its
records whose ``family_field`` is ``target_family``, per seed) is reported with the pool's base
rate.

:func:`run_comparison` is the part after selection, for selections made elsewhere (the demo
selects through the REST service). ``gradstore eval`` is the command-line front end;
:func:`format_table` prints a result and :func:`to_json` serialises it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradstore.selection.errors import SelectionError

# The arms besides the strategies' (which are named by their strategy labels).
BASE_ARM, FULL_ARM = "base", "full"
DEFAULT_STRATEGIES = ("less", "random")
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
    precisions: list[float] = field(default_factory=list)  # per seed, with a family field (selections only)

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
            "train_seconds": list(self.train_seconds), "precisions": list(self.precisions),
        }

    @property
    def precision_mean(self) -> float | None:
        return statistics.fmean(self.precisions) if self.precisions else None


@dataclass
class ComparisonResult:
    """Every arm's results and the selections (see the module docstring)."""

    arms: dict[str, ArmResult]  # base, then the strategies in the order given, then full
    pool: int  # records in the pool
    selected: int  # records of the budget (a strategy that stops early selects fewer: see each arm)
    fraction: float | None
    heldout: int  # held-out records evaluated
    selected_ids: dict[str, dict[int, list[str]]]  # per strategy arm and seed, the selected ids
    base_rate: float | None = None  # share of the pool of the target family
    family_field: str | None = None
    target_family: str | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "pool": self.pool, "selected": self.selected, "fraction": self.fraction, "heldout": self.heldout,
            "base_rate": self.base_rate, "family_field": self.family_field, "target_family": self.target_family,
            "arms": {name: arm.to_dict() for name, arm in self.arms.items()},
            "settings": self.settings, "seconds": self.seconds,
            "selected_ids": {arm: {str(seed): ids for seed, ids in by_seed.items()}
                             for arm, by_seed in self.selected_ids.items()},
        }


# ------------------------------------------------------------------------------------------------
# Running


def pool_records(store) -> list[dict]:
    """Every record of a datastore (a :class:`Datastore` or its folder), in row order, original form."""
    from gradstore.datastore import Datastore

    if not isinstance(store, Datastore):
        store = Datastore.open(store)
    table = store.examples(columns=["row", "record"], live_only=True)
    rows = table.column("row").to_pylist()
    texts = table.column("record").to_pylist()
    records: list[dict | None] = [None] * len(rows)
    for row, text in zip(rows, texts):
        records[row] = json.loads(text)
    return records


def store_model(store) -> dict:
    """What fine-tuning needs from a store's manifest: the base model and tokenizer folders, the
    chat format and the maximum length the store was built with."""
    from gradstore.datastore import Datastore

    manifest = store.manifest if isinstance(store, Datastore) else Datastore.open(store).manifest
    template = _TEMPLATES.get(manifest.tokenizer.get("template"), "auto")
    return {
        "model_dir": Path(manifest.model.path),
        "tokenizer_dir": Path(manifest.tokenizer.get("path") or manifest.model.path),
        "template": template,
        "max_length": int(manifest.tokenizer.get("max_length", 512)),
    }


def compare(store_path: str | Path, targets: Sequence[dict], heldout: Sequence[dict], *, fraction: float = 0.05,
            strategies: Sequence[str | dict] = DEFAULT_STRATEGIES, seeds: Sequence[int] = (0, 1, 2),
            include_full: bool = True, full_seeds: Sequence[int] | None = None, settings=None,
            full_epochs: int | None = 1, max_length: int | None = None, max_new_tokens: int = 32,
            eval_batch_size: int = 32, family_field: str | None = None, target_family: str | None = None,
            device: str = "auto", progress: bool = True, log: Callable[[str], None] = print) -> ComparisonResult:
    """Select ``fraction`` of the store with each strategy, then :func:`run_comparison`.

    ``strategies``: strategy specs (``"quality:effective_rank"``, see
    :func:`~gradstore.selection.strategies.parse_strategy_spec`) or their options as dicts.
    ``settings`` is a :class:`~gradstore.indexer.finetune.FinetuneSettings` (its ``max_length``
    and ``template`` are replaced by the store's unless ``max_length`` is given); ``full_epochs``
    (None: the same as the other arms) is the full corpus's number of epochs.
    """
    from gradstore.datastore import Datastore
    from gradstore.indexer.finetune import FinetuneSettings

    started = time.perf_counter()
    store = Datastore.open(store_path)
    specs = [parse_strategy(spec) for spec in strategies]
    log(f"selecting {fraction:.0%} of {store.num_examples:,} examples with {len(specs)} strategies for "
        f"{len(targets)} target example(s)")
    selections = select_with_strategies(store, specs, targets, fraction, seeds, device)
    pool = pool_records(store)
    chosen = {label: {seed: [pool[int(row)] for row in rows] for seed, rows in by_seed.items()}
              for label, by_seed in selections.items()}

    found = store_model(store)
    settings = settings or FinetuneSettings()
    settings = settings.replace(max_length=max_length or found["max_length"], template=found["template"])
    result = run_comparison(pool, chosen, heldout, found["model_dir"], found["tokenizer_dir"], settings=settings,
                            seeds=seeds, include_full=include_full, full_seeds=full_seeds,
                            full_epochs=full_epochs, max_new_tokens=max_new_tokens,
                            eval_batch_size=eval_batch_size, family_field=family_field,
                            target_family=target_family, device=device, progress=progress, log=log)
    result.fraction = fraction
    result.seconds = time.perf_counter() - started
    return result


def parse_strategy(spec: str | dict) -> dict:
    """A strategy spec (text or options dict) as validated options (a dict with its ``name``)."""
    from gradstore.selection.engine import selection_options
    from gradstore.selection.strategies import parse_strategy_spec

    try:
        options = parse_strategy_spec(spec) if isinstance(spec, str) else dict(spec)
    except ValueError as err:
        raise SelectionError(str(err)) from None
    return selection_options({"strategy": options, "k": 1}).strategy.model_dump(exclude_unset=True)


def seeded_by_run(options: dict) -> bool:
    """Whether a strategy draws with a seed that the comparison should vary per fine-tuning seed."""
    from gradstore.selection.strategies import get_strategy

    return "seed" in get_strategy(options["name"]).Options.model_fields and "seed" not in options


def select_with_strategies(store, specs: Sequence[dict], targets: Sequence[dict], fraction: float,
                           seeds: Sequence[int], device: str = "auto") -> dict[str, dict[int, list[int]]]:
    """Per strategy label and fine-tuning seed, the rows each strategy selects (``fraction`` of
    the pool; targets featurised once, for the strategies that use them)."""
    from gradstore.selection import SelectionEngine, TargetFeaturizer
    from gradstore.selection.strategies import get_strategy, strategy_label

    engine = SelectionEngine(store)
    target_set = None
    if any(get_strategy(spec["name"]).needs_targets != "none" for spec in specs):
        target_set = TargetFeaturizer(store, device=device).featurize(list(targets))
    selections: dict[str, dict[int, list[int]]] = {}
    for spec in specs:
        label = strategy_label(spec)
        if label in selections:
            raise SelectionError(f"strategy {label!r} is listed twice")
        uses = target_set if get_strategy(spec["name"]).needs_targets != "none" else None
        draws = {seed: {**spec, "seed": seed} for seed in seeds} if seeded_by_run(spec) else {None: spec}
        picked = {seed: engine.select(uses, {"strategy": options, "fraction": fraction}).rows.tolist()
                  for seed, options in draws.items()}
        selections[label] = {seed: picked[seed if seed in picked else None] for seed in seeds}
    return selections


def run_comparison(pool: Sequence[dict], selections: Mapping[str, Mapping[int, Sequence[dict]]],
                   heldout: Sequence[dict], model_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                   settings=None, seeds: Sequence[int] = (0, 1, 2), include_full: bool = True,
                   full_seeds: Sequence[int] | None = None, full_epochs: int | None = 1,
                   max_new_tokens: int = 32, eval_batch_size: int = 32, family_field: str | None = None,
                   target_family: str | None = None, device: str = "auto", progress: bool = True,
                   log: Callable[[str], None] = print) -> ComparisonResult:
    """Fine-tune and evaluate every arm for selections already made (see the module docstring).

    ``pool``: every record of the corpus; ``selections``: per arm label and seed, the records
    that arm fine-tunes on with that seed (subsets of the pool: one budget, but a strategy that
    stops early, ``gio``, may select fewer); ``heldout``:
    the target task's held-out records, with ``"answer"``.
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
    _check_selections(selections, pool, seeds)
    if not heldout:
        raise JobError("no held-out records to evaluate on")
    full_epochs = full_epochs or settings.epochs
    tokenizer_dir = tokenizer_dir or model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    torch_device = resolve_device(device)
    size = max(len(records) for by_seed in selections.values() for records in by_seed.values())

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
    log(f"evaluating on {len(heldout)} held-out records; fine-tuning on {size} records selected by each of "
        f"{', '.join(selections)} ({len(seeds)} seed(s)){f', and on all {len(pool)}' if include_full else ''}")

    base = load_base_model(model_dir, settings.dtype, torch_device)
    loss, accuracy = measure(base, "base model")
    del base
    arms[BASE_ARM] = ArmResult(BASE_ARM, 0, 0, [], [loss], [accuracy])

    subsets = {label: {seed: list(by_seed[seed]) for seed in seeds} for label, by_seed in selections.items()}
    if include_full:
        subsets[FULL_ARM] = {seed: list(pool) for seed in full_seeds}
    for name, by_seed in subsets.items():
        epochs = full_epochs if name == FULL_ARM else settings.epochs
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
            if family_field is not None and target_family is not None and name != FULL_ARM:
                arm.precisions.append(family_share(records, family_field, target_family))
        arms[name] = arm

    result = ComparisonResult(
        arms=arms, pool=len(pool), selected=size, fraction=None, heldout=len(heldout),
        selected_ids={label: {seed: [str(record.get("id", "")) for record in records]
                              for seed, records in by_seed.items()} for label, by_seed in selections.items()},
        family_field=family_field, target_family=target_family,
        settings={**settings.to_dict(), "full_epochs": full_epochs, "max_new_tokens": max_new_tokens,
                  "seeds": seeds, "full_seeds": full_seeds if include_full else [],
                  "model": str(model_dir), "tokenizer": str(tokenizer_dir)},
    )
    if family_field is not None and target_family is not None:
        result.base_rate = family_share(pool, family_field, target_family)
    result.seconds = time.perf_counter() - started
    return result


def _check_selections(selections: Mapping[str, Mapping[int, Sequence[dict]]], pool: Sequence[dict],
                      seeds: Sequence[int]) -> None:
    from gradstore.indexer.errors import JobError

    if not selections or not pool:
        raise JobError("nothing to compare: give at least one selection and a non-empty pool")
    for label, by_seed in selections.items():
        if label in (BASE_ARM, FULL_ARM):
            raise JobError(f"{label!r} names a built-in arm; name the selection otherwise")
        missing = [seed for seed in seeds if seed not in by_seed]
        if missing:
            raise JobError(f"selection {label!r} has no subset for seed {missing[0]}")
        sizes = sorted({len(by_seed[seed]) for seed in seeds})
        if sizes[0] == 0 or sizes[-1] > len(pool):
            raise JobError(f"selection {label!r} has {sizes[0] if sizes[0] == 0 else sizes[-1]} records, the pool "
                           f"{len(pool)}: expected a non-empty subset of the pool")


def family_share(records: Sequence[dict], family_field: str, target_family: str) -> float:
    """Share of ``records`` whose ``family_field`` equals ``target_family`` (compared as strings)."""
    if not records:
        return 0.0
    return sum(str(record.get(family_field)) == str(target_family) for record in records) / len(records)


# ------------------------------------------------------------------------------------------------
# Output

_LABELS = {BASE_ARM: "base model", FULL_ARM: "full corpus"}


def format_table(result: ComparisonResult) -> str:
    """A fixed-width table: one row per arm (precision with a family field), then every seed's values."""
    width = max([14] + [len(name) + 2 for name in result.arms])
    with_precision = result.base_rate is not None
    header = (f"{'arm':<{width}}{'examples':>9}{'epochs':>8}{'seeds':>7}   {'held-out loss':<17}   {'accuracy':<17}"
              + ("   precision" if with_precision else ""))
    lines = [header, "-" * len(header)]
    for name, arm in result.arms.items():
        seeds = str(len(arm.seeds)) if arm.seeds else "-"
        loss = f"{arm.loss_mean:.4f}" + (f" ± {arm.loss_std:.4f}" if len(arm.losses) > 1 else "")
        accuracy = f"{arm.accuracy_mean:.1%}" + (f" ± {arm.accuracy_std:.1%}" if len(arm.accuracies) > 1 else "")
        epochs = str(arm.epochs) if arm.epochs else "-"
        precision = f"   {arm.precision_mean:.1%}" if with_precision and arm.precisions else ""
        lines.append(f"{_LABELS.get(name, name):<{width}}{arm.examples:>9,}{epochs:>8}{seeds:>7}   {loss:<17}   "
                     f"{accuracy:<17}{precision}")
    lines.append("")
    fraction = f" ({result.fraction:.0%})" if result.fraction is not None else ""
    lines.append(f"held-out: {result.heldout} records; pool: {result.pool:,} records; "
                 f"each selection: {result.selected:,}{fraction}")
    if with_precision:
        lines.append(f"precision: share of a selection from {result.family_field} = {result.target_family}; "
                     f"base rate {result.base_rate:.1%}")
    lines.append("per seed (seed: loss / accuracy):")
    for name, arm in result.arms.items():
        if arm.seeds:
            values = ", ".join(f"{seed}: {loss:.4f} / {accuracy:.1%}"
                               for seed, loss, accuracy in zip(arm.seeds, arm.losses, arm.accuracies))
            lines.append(f"  {_LABELS.get(name, name):<{width}} {values}")
    return "\n".join(line.rstrip() for line in lines)


def to_json(result: ComparisonResult) -> str:
    """The result as a JSON document (means, standard deviations, per-seed values, settings)."""
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
