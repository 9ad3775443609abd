"""The ``gradstore`` command line.

Each subcommand imports what it needs when it runs, so ``gradstore --help`` works with the base
install and a missing extra gives a one-line hint instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_ERROR = 1


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with ``(default: X)`` once: not when the help already says its default
    in words (``(default: PEFT's for the model)``), nor when there is no value to show (``None``, a
    flag's ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default == []:
            return text
        return super()._get_help_string(action)


def _size(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1000000`` -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def _add_index_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="build a gradient datastore from a corpus",
        formatter_class=DefaultsHelpFormatter,
        description="Compute per-example projected LoRA gradients of a corpus at one or more checkpoints "
                    "and write them as a datastore (fp16 .npy features, Parquet examples and scores, "
                    "manifest.json). Re-running the same command resumes an interrupted job. With --append, "
                    "add a corpus to an existing store as its next version, with the store's own settings "
                    "(the flags below default to them).",
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument("--corpus", action="append", default=[], metavar="[NAME=]PATH",
                    help="corpus file (JSONL, Parquet) or datasets save_to_disk folder; repeat for several "
                         "sources; NAME defaults to the file stem")
    io.add_argument("--corpus-list", type=Path, metavar="FILE",
                    help="a file of --corpus entries, one [NAME=]PATH per line (for more than a command line holds)")
    io.add_argument("--model", type=Path, help="local folder of a Hugging Face causal LM (required unless --append)")
    io.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder)")
    io.add_argument("--out", required=True, type=Path, help="datastore folder to create (or, with --append, to add to)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing datastore at --out")
    io.add_argument("--append", action="store_true",
                    help="add the corpus to the datastore at --out as a new version, indexed with the store's "
                         "recorded settings (a flag given with another value is refused, naming it); readers "
                         "switch to the new version when it is complete")
    io.add_argument("--replace", action="store_true",
                    help="with --append: a record whose id the store already holds replaces that example "
                         "(without it, such ids are refused)")
    io.add_argument("--restart", action="store_true",
                    help="discard a partial job at --out that was started with other settings")

    ck = p.add_argument_group("checkpoints and gradients")
    ck.add_argument("--run", type=Path, metavar="DIR",
                    help="a `gradstore warmup` output folder: use all its checkpoints, weighted by their "
                         "recorded average learning rates (instead of --checkpoint)")
    ck.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]DIR[:WEIGHT]",
                    help="LoRA checkpoint folder (adapter + optimizer.pt/optimizer.bin); repeat for several. "
                         "WEIGHT defaults to the learning rate recorded with it, else uniform")
    ck.add_argument("--gradient-type", default="adam", choices=["sgd", "sign", "adam", "less"],
                    help="adam: bias-corrected Adam direction from the saved optimizer (training data); "
                         "less: the LESS reference formula; sgd: plain gradient (targets); sign")
    ck.add_argument("--lora-r", type=int, default=8, help="rank of a fresh LoRA (no --checkpoint)")
    ck.add_argument("--lora-alpha", type=float, default=16.0, help="alpha of a fresh LoRA")
    ck.add_argument("--lora-targets", default=None,
                    help="comma-separated target modules of a fresh LoRA (default: PEFT's for the model)")
    ck.add_argument("--trust-pickled-checkpoints", action="store_true",
                    help="load optimizer files that torch.load(weights_only=True) refuses by unpickling them in "
                         "full: this RUNS ANY CODE THE FILE HOLDS, as your user; only for files you made or trust "
                         "(off by default; `gradstore convert-optimizer` makes a file that needs no such trust)")
    ck.add_argument("--proj-dim", type=int, default=8192, help="projection dimension k")
    ck.add_argument("--projection", default="sjlt", choices=["sjlt", "rademacher"],
                    help="sjlt: sparse sign projection, cost independent of k, same error variance as dense; "
                         "rademacher: dense ±1 matrix as LESS/TRAK use")
    ck.add_argument("--proj-nonzeros", type=int, default=None,
                    help="sjlt only: outputs per gradient coordinate (default 4; must divide --proj-dim)")
    ck.add_argument("--seed", type=int, default=0, help="projection seed (and fresh-LoRA init seed)")

    tok = p.add_argument_group("tokenisation")
    tok.add_argument("--max-length", type=int, default=2048, help="truncate examples to this many tokens")
    tok.add_argument("--template", default="auto", choices=["auto", "default", "tokenizer"],
                     help="chat format: the tokenizer's chat template, or the documented default")
    tok.add_argument("--on-bad-record", default="error", choices=["error", "skip"],
                     help="stop at the first malformed record, or skip and report them in skipped.jsonl")

    run = p.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    from gradstore.indexer.batching import default_batching  # no torch: --help works with the base install

    cpu_batch, cuda_batch = default_batching("cpu"), default_batching("cuda")
    run.add_argument("--max-tokens-per-batch", type=int, default=None,
                     help=f"token budget of a batch, padded length x examples (default: {cuda_batch[0]} on CUDA, "
                          f"{cpu_batch[0]} on CPU)")
    run.add_argument("--max-batch-size", type=int, default=None,
                     help=f"most examples in a batch (default: {cuda_batch[1]} on CUDA, {cpu_batch[1]} on CPU)")
    run.add_argument("--shard-size", type=int, default=1024,
                     help="examples per shard (the unit of resumption and of multi-process work)")
    from gradstore.datastore.layout import INDEX_KINDS  # no FAISS: --help works with the base install

    run.add_argument("--index", default="auto", choices=list(INDEX_KINDS), metavar="KIND",
                     help="FAISS index for approximate search; exact searches scan the stored features. "
                          + "; ".join(f"{kind}: {what}" for kind, what in INDEX_KINDS.items()))
    run.add_argument("--index-memory", type=_size, default="4GiB",
                     help="memory budget steering --index auto and bounding an ivf-ondisk build (e.g. 4GiB)")
    extra = p.add_argument_group("extra per-example features (computed by default, in the same pass)")
    extra.add_argument("--no-representations", action="store_true",
                       help="no representation vectors (RDS+: position-weighted mean of the last hidden states of "
                            "the first checkpoint's model, fp16); the rds strategy needs them")
    extra.add_argument("--no-gradient-spectra", action="store_true",
                       help="no nuclear_norm and effective_rank of each example's weight gradients per checkpoint")
    extra.add_argument("--no-vog", action="store_true",
                       help="no vog (variance of input-embedding gradients across checkpoints; needs two or more)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--progress-file", type=Path, metavar="PATH",
                     help="keep a JSON progress report here: done, total, examples_per_second, eta_seconds, "
                          "phase (for supervisors such as the service's job runner)")
    p.set_defaults(handler=_run_index, index_defaults={a.dest: a.default for a in p._actions})


# The IndexJobConfig settings each index flag sets, as ``field`` or ``field.attribute`` (one part
# of a spec): with --append, a setting that no flag given sets keeps the store's recorded value.
# The projection kind decides the spec's other parts (its non-zeros, its hash version), so it sets
# the whole projection.
_INDEX_SETTING_FLAGS = {
    "model": ("model",), "tokenizer": ("tokenizer",), "run": ("checkpoints",), "checkpoint": ("checkpoints",),
    "lora_r": ("lora.r",), "lora_alpha": ("lora.alpha",), "lora_targets": ("lora.target_modules",),
    "seed": ("lora.init_seed", "projection.seed"), "gradient_type": ("gradient_type",),
    "projection": ("projection",), "proj_dim": ("projection.dim",), "proj_nonzeros": ("projection.nonzeros",),
    "max_length": ("max_length",), "template": ("template",), "max_tokens_per_batch": ("max_tokens_per_batch",),
    "max_batch_size": ("max_batch_size",), "shard_size": ("shard_size",), "dtype": ("dtype",), "index": ("index",),
    "index_memory": ("index_memory_budget",), "no_representations": ("extras.representations",),
    "no_gradient_spectra": ("extras.gradient_spectra",), "no_vog": ("extras.vog",),
    "on_bad_record": ("on_bad_record",),
}


def _given_settings(args) -> list[str]:
    """The settings (see ``_INDEX_SETTING_FLAGS``) of the flags given with a value other than their default."""
    defaults = args.index_defaults
    return sorted({setting for flag, settings in _INDEX_SETTING_FLAGS.items()
                   if getattr(args, flag) != defaults[flag] for setting in settings})


def _run_index(args) -> int:
    from gradstore.indexer.checkpoints import CheckpointSpec
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.extras import ExtraFeatures
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.model import LoraSpec
    from gradstore.indexer.projection import ProjectionSpec

    targets = _split_targets(args.lora_targets)
    corpus = list(args.corpus)
    if args.corpus_list is not None:
        try:
            corpus += [line for line in args.corpus_list.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise SystemExit(f"gradstore index: cannot read --corpus-list {args.corpus_list}: {err.strerror}") from None
    if not corpus:
        raise SystemExit("gradstore index: give the corpus with --corpus or --corpus-list")
    checkpoints = [CheckpointSpec.parse(spec) for spec in args.checkpoint]
    if args.run is not None:
        from gradstore.indexer.warmup import read_run_manifest

        if checkpoints:
            raise SystemExit("gradstore index: give --run or --checkpoint, not both")
        checkpoints = read_run_manifest(args.run)
    if args.model is None and not args.append:
        raise SystemExit("gradstore index: give the model with --model (or --append to a store, which records it)")
    config = IndexJobConfig(
        corpus=[CorpusSource.parse(spec) for spec in corpus],
        model=args.model or Path(), out=args.out, tokenizer=args.tokenizer,
        checkpoints=checkpoints,
        lora=LoraSpec(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets, init_seed=args.seed),
        gradient_type=args.gradient_type,
        projection=ProjectionSpec(kind=args.projection, dim=args.proj_dim, seed=args.seed,
                                  nonzeros=args.proj_nonzeros),
        max_length=args.max_length, template=args.template,
        max_tokens_per_batch=args.max_tokens_per_batch, max_batch_size=args.max_batch_size,
        shard_size=args.shard_size, dtype=args.dtype, device=args.device, index=args.index,
        index_memory_budget=args.index_memory,
        extras=ExtraFeatures(representations=not args.no_representations,
                             gradient_spectra=not args.no_gradient_spectra, vog=not args.no_vog),
        on_bad_record=args.on_bad_record,
        overwrite=args.overwrite, append=args.append, replace=args.replace, restart=args.restart,
        progress=not args.no_progress, progress_file=args.progress_file,
        trust_pickled_checkpoints=args.trust_pickled_checkpoints,
    )
    if args.append:
        from gradstore.indexer.job import config_for_append

        config = config_for_append(config, _given_settings(args))
    try:
        summary = IndexJob(config, log=lambda line: print(line, file=sys.stderr)).run()
    except OSError as err:
        # A system error the job does not translate itself: still one line naming the file.
        from gradstore.datastore import os_reason

        print(f"error: {err.filename or args.out}: {os_reason(err)}", file=sys.stderr)
        return EXIT_ERROR
    if summary is not None:
        print(f"datastore written to {args.out}")
        for line in summary.lines():
            print(f"  {line}")
    return 0


def _split_targets(text: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


def _add_warmup_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "warmup", help="LESS warmup: short LoRA training with one checkpoint per epoch",
        formatter_class=DefaultsHelpFormatter,
        description="Train a fresh LoRA on a random fraction of the corpus and save one checkpoint per epoch "
                    "(adapter, optimizer state, average learning rate) plus warmup_run.json, which "
                    "`gradstore index --run DIR` reads directly. Defaults are LESS's.",
    )
    p.add_argument("--corpus", action="append", required=True, metavar="[NAME=]PATH", help="corpus file(s)")
    p.add_argument("--model", required=True, type=Path, help="local folder of a Hugging Face causal LM")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the corpus to train on")
    p.add_argument("--seed", type=int, default=0, help="sampling, LoRA init and shuffling seed")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup share of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per optimizer step: a training setting, the same on every device")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=float, default=512.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated target modules (default: PEFT's attention projections for the model)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--template", default="auto", choices=["auto", "default", "tokenizer"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--optimizer-format", default="pt", choices=["pt", "bin"],
                   help="optimizer state file: HF Trainer's integer-keyed optimizer.pt, or a name-keyed "
                        "optimizer.bin (accelerate / FSDP layout); `gradstore index` reads both")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_warmup)


def _run_warmup(args) -> int:
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    config = WarmupConfig(
        corpus=[CorpusSource.parse(spec) for spec in args.corpus], model=args.model, out=args.out,
        tokenizer=args.tokenizer, fraction=args.fraction, seed=args.seed, epochs=args.epochs,
        learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=_split_targets(args.lora_targets), batch_size=args.batch_size,
        max_length=args.max_length, template=args.template, dtype=args.dtype, device=args.device,
        progress=not args.no_progress, overwrite=args.overwrite, optimizer_format=args.optimizer_format,
    )
    result = run_warmup(config, log=lambda line: print(line, file=sys.stderr))
    print(f"warmup run written to {result.out}: {len(result.checkpoints)} checkpoints, "
          f"average learning rates {', '.join(f'{lr:.3g}' for lr in result.average_learning_rates)}")
    print(f"next: gradstore index --run {result.out} --model {args.model} --corpus ... --out STORE")
    return 0


def _add_convert_optimizer_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-optimizer", help="rewrite an optimizer state so that it loads without running code",
        description="Rewrite an optimizer.pt / optimizer.bin that torch.load(weights_only=True) refuses (it "
                    "holds Python objects besides tensors and numbers) as a file that loads safely: tensors, "
                    "numbers, strings and containers are kept, NumPy values converted, other objects dropped. "
                    "IN is unpickled in full, which RUNS ANY CODE IT HOLDS: run this only on a file you made or "
                    "trust, then give the jobs OUT.")
    p.add_argument("source", type=Path, metavar="IN", help="optimizer state file to convert")
    p.add_argument("dest", type=Path, metavar="OUT", help="file to write (e.g. CHECKPOINT/optimizer.pt)")
    p.set_defaults(handler=_run_convert_optimizer)


def _run_convert_optimizer(args) -> int:
    from gradstore.indexer.optimizer_state import convert_optimizer_file

    if args.dest.resolve() == args.source.resolve():
        raise SystemExit("gradstore convert-optimizer: OUT must differ from IN (keep the original until OUT works)")
    dropped = convert_optimizer_file(args.source, args.dest)
    for where in dropped:
        print(f"dropped {where}: not tensors, numbers or strings", file=sys.stderr)
    print(f"optimizer state written to {args.dest}")
    return 0


def _add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a datastore",
                              description="Print a datastore's manifest summary (or the manifest as JSON).")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    p.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    from gradstore.datastore import Datastore

    store = Datastore.open(args.store, verify=args.verify)
    m = store.manifest
    if args.json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return 0
    print(f"datastore     {store.path}")
    print(f"version       {m.version} ({m.history[-1].action}, {m.updated_at}); {len(m.segments)} segment(s), "
          f"{m.shards.count} shard(s)")
    removed = f", {m.counts.removed:,} removed" if m.counts.removed else ""
    print(f"examples      {m.counts.examples:,} ({m.counts.skipped:,} skipped, {m.counts.truncated:,} truncated{removed})")
    for source, count in m.counts.by_source.items():
        print(f"  {source:<12}{count:,}")
    print(f"model         {m.model.path} ({m.model.architecture}, {m.model.dtype})")
    print(f"lora          r={m.lora.r} alpha={m.lora.alpha} targets={','.join(m.lora.target_modules)} "
          f"({m.lora.num_params:,} params)")
    print(f"gradients     {m.gradient_type}, projected to k={m.features.dim} "
          f"({m.projection['kind']}, seed {m.projection['seed']}), {m.features.dtype}")
    print("checkpoints")
    for c in m.checkpoints:
        print(f"  {c.name:<12}weight {c.weight:.4f}  {c.path or '(fresh LoRA)'}")
    if m.index is not None:
        print(f"index         {m.index.kind} ({m.index.factory}), dim {m.index.dim}, {m.index.ntotal:,} vectors")
    else:
        print("index         none (exact searches scan the features)")
    if m.features.quantized:
        print(f"quantised     {', '.join(m.features.quantized)} copies of the features")
    representations = m.extras.representations
    print(f"extras        representations: "
          f"{f'{representations.dim} dims ({representations.checkpoint})' if representations else 'none'}; "
          f"scores: {', '.join(store.score_names)}")
    print(f"tokens        {m.tokens.get('total', 0):,} (mean {m.tokens.get('mean', 0):.1f}, "
          f"max {m.tokens.get('max', 0)})")
    size = sum(f.bytes for f in m.files.values())
    print(f"size          {size / 2**20:,.1f} MiB in {len(m.files)} files")
    if args.verify:
        print("checksums     ok")
    return 0


def _add_select_parser(subparsers) -> None:
    from gradstore.selection.strategies import DEFAULT_STRATEGY, registry

    strategies = registry()
    listing = "; ".join(f"{name}: {cls.summary}" for name, cls in strategies.items())
    p = subparsers.add_parser(
        "select", help="select training examples with a strategy (LESS by default)",
        formatter_class=DefaultsHelpFormatter,
        description="Choose examples of a datastore with a selection strategy and print the ranked selection. "
                    "The default, less, scores every example against target examples with LESS (sum over "
                    "checkpoints of w_c * cos(train_c, target_c), aggregated over the targets). Targets come from "
                    "an sgd datastore of target examples (--targets-store) or from target records (--targets), "
                    "whose gradients are then computed with the datastore's own model, checkpoints and "
                    f"projection; target-free strategies take none. Strategies: {listing}.",
    )
    p.add_argument("store", type=Path, help="datastore folder of the training pool")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--targets-store", type=Path, metavar="DIR",
                         help="datastore of the target examples (gradstore index --gradient-type sgd)")
    targets.add_argument("--targets", type=Path, metavar="FILE",
                         help="target records (JSONL or Parquet, corpus format)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--k", type=int, metavar="N", help="select N examples")
    budget.add_argument("--fraction", type=float, metavar="F", help="select ceil(F x pool) examples")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=list(strategies),
                   help="how to choose (options below; each names the strategies that take it)")
    _add_strategy_option_flags(p.add_argument_group("strategy options"), strategies)
    p.add_argument("--subtask-field", metavar="NAME",
                   help="record field naming each target's subtask (default: one subtask)")
    p.add_argument("--sources", type=_names, metavar="A,B", help="only examples of these corpus sources")
    p.add_argument("--filter", dest="filters", action="append", type=_quality_filter,
                   metavar="SCORE:above|below:Q[:CHECKPOINT]",
                   help="keep examples whose stored SCORE is at or above / at or below its quantile Q in the pool, "
                        "before the strategy runs (repeatable; vog:below:0.95 drops the top 5 %% by VoG)")
    p.add_argument("--per-source-cap", type=int, metavar="N", help="at most N examples per source")
    p.add_argument("--dedup-threshold", type=float, metavar="X",
                   help="skip a candidate whose gradient similarity to an already selected example exceeds X")
    p.add_argument("--diversity-weight", type=float, metavar="LAMBDA",
                   help="re-rank by maximal marginal relevance: each pick maximises score - LAMBDA x its largest "
                        "similarity to the picks so far (ranked strategies; not with --per-source-cap or "
                        "--dedup-threshold)")
    p.add_argument("--export", type=Path, metavar="OUT.jsonl|OUT.parquet",
                   help="write the selected records, in their original form and rank order")
    p.add_argument("--scores", type=Path, metavar="OUT.parquet",
                   help="write the whole pool's ranked scores (rank, row, id, source, score, score_<subtask>)")
    p.add_argument("--json", action="store_true", help="print one JSON object per selected example")
    p.add_argument("--device", default="auto", help="where target gradients are computed (with --targets)")
    p.set_defaults(handler=_run_select)


def _add_strategy_option_flags(group, strategies) -> None:
    """One flag per option field of any strategy (``--aggregation``, ``--score``, ``--seed``...),
    its type, choices and help read from the strategies' options models."""
    for field, owners in _strategy_fields(strategies).items():
        kinds = [_flag_kind(info.annotation) for info in owners.values()]
        kind = kinds[0][0]
        choices = list(dict.fromkeys(c for _, cs in kinds for c in cs or [])) or None
        descriptions = {info.description or field for info in owners.values()}
        help_text = (next(iter(descriptions)) + f" [{', '.join(owners)}]" if len(descriptions) == 1 else
                     _once_each_default("; ".join(f"{name}: {info.description or field}"
                                                  for name, info in owners.items())))
        group.add_argument(f"--{field.replace('_', '-')}", dest=f"strategy_{field}", type=kind, choices=choices,
                           default=argparse.SUPPRESS, metavar=_flag_metavar(kind, choices),
                           help=help_text.replace("%", "%%"))


def _once_each_default(text: str) -> str:
    """``text`` with a repeated ``(default: X)`` said only where it first appears."""
    import re

    seen: set[str] = set()

    def keep_first(match) -> str:
        if match.group(0) in seen:
            return ""
        seen.add(match.group(0))
        return match.group(0)

    return re.sub(r" ?\(default: [^)]*\)", keep_first, text)


def _strategy_fields(strategies) -> dict[str, dict]:
    """Every option field of the strategies: field name -> {strategy name: its FieldInfo}."""
    fields: dict[str, dict] = {}
    for name, cls in strategies.items():
        for field, info in cls.Options.model_fields.items():
            if field != "name":
                fields.setdefault(field, {})[name] = info
    return fields


def _flag_kind(annotation):
    """The argparse type and choices of an options field: a Literal's values, names (A,B),
    NAME=WEIGHT pairs, or the field's scalar type."""
    import types
    import typing

    inner = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(inner) is typing.Literal:
        return str, list(typing.get_args(inner))
    if typing.get_origin(inner) is list:
        return _names, None
    if typing.get_origin(inner) is dict:
        return _checkpoint_weights, None
    return inner, None


def _flag_metavar(kind, choices) -> str | None:
    if choices:
        return None
    return {_names: "A,B", _checkpoint_weights: "A=W,B=W", int: "N", float: "X"}.get(kind, "VALUE")


def _quality_filter(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[1] not in ("above", "below"):
        raise argparse.ArgumentTypeError(f"expected SCORE:above|below:Q[:CHECKPOINT], got {text!r}")
    try:
        quantile = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the quantile {parts[2]!r} is not a number") from None
    spec = {"score": parts[0], "keep": parts[1], "quantile": quantile}
    if len(parts) == 4:
        spec["checkpoint"] = parts[3]
    return spec


def _strategy_from_args(args) -> dict:
    """The chosen strategy's options from its flags; a flag of another strategy is an error."""
    from gradstore.selection.strategies import get_strategy

    cls = get_strategy(args.strategy)
    given = {key[len("strategy_"):]: value for key, value in vars(args).items() if key.startswith("strategy_")}
    foreign = sorted(set(given) - set(cls.Options.model_fields))
    if foreign:
        own = [f"--{f.replace('_', '-')}" for f in cls.Options.model_fields if f != "name"]
        raise _UsageError(f"--{foreign[0].replace('_', '-')} is not an option of strategy {cls.name!r} "
                          f"(its options: {', '.join(own) or 'none'})")
    return {"name": cls.name, **given}


class _UsageError(Exception):
    """A command line that cannot run as given (exit status 2, one line)."""


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _checkpoint_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in _names(text):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT pairs, got {item!r}")
    return weights


def _run_select(args) -> int:
    from gradstore.indexer.corpus import CorpusSource, read_corpus
    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine, TargetSet
    from gradstore.selection.engine import selection_options
    from gradstore.selection.strategies import get_strategy

    needs = get_strategy(args.strategy).needs_targets
    given = args.targets_store is not None or args.targets is not None
    if needs == "required" and not given:
        raise _UsageError(f"strategy {args.strategy!r} needs targets: give --targets-store DIR or --targets FILE")
    if needs == "none" and given:
        raise _UsageError(f"strategy {args.strategy!r} does not use targets; leave out --targets/--targets-store")
    store = Datastore.open(args.store)
    engine = SelectionEngine(store)
    fields = {"strategy": _strategy_from_args(args), "k": args.k, "fraction": args.fraction, "sources": args.sources,
              "filters": args.filters, "per_source_cap": args.per_source_cap, "dedup_threshold": args.dedup_threshold,
              "diversity_weight": args.diversity_weight}
    options = selection_options({key: value for key, value in fields.items() if value is not None})
    # Refuse a bad query before computing any target gradient.
    engine.filtered_pool(options)
    if getattr(options.strategy, "checkpoints", None) or getattr(options.strategy, "weights", None):
        engine.resolve_checkpoints(options.strategy.checkpoints, options.strategy.weights)
    targets = None
    if args.targets_store is not None:
        targets = TargetSet.from_datastore(Datastore.open(args.targets_store), args.subtask_field)
    elif args.targets is not None:
        from gradstore.selection import TargetFeaturizer

        records = [r.record for r in read_corpus([CorpusSource.parse(str(args.targets))]).records]
        targets = TargetFeaturizer(store, device=args.device).featurize(records, args.subtask_field)
    selection = engine.select(targets, options)
    if args.export is not None:
        engine.export(selection, args.export)
        print(f"selected records written to {args.export}", file=sys.stderr)
    if args.scores is not None:
        engine.write_scores(selection, args.scores)
        print(f"scores written to {args.scores}", file=sys.stderr)
    items = selection.items()
    if args.json:
        for item in items:
            print(json.dumps(item, ensure_ascii=False))
    else:
        id_width = max([len("id")] + [len(item["id"]) for item in items])
        rank_width = max(len("rank"), len(str(len(items))))
        print(f"{'rank':>{rank_width}}  {'score':>10}  {'id':<{id_width}}  source")
        for item in items:
            print(f"{item['rank']:>{rank_width}}  {item['score']:>10.6f}  {item['id']:<{id_width}}  {item['source']}")
    print(_selection_summary(selection, targets), file=sys.stderr)
    return 0


def _selection_summary(selection, targets) -> str:
    from gradstore.selection.strategies import strategy_label

    parts = [f"strategy {strategy_label(selection.strategy)}"]
    if targets is not None:
        parts.append(f"{targets.num_targets} targets, {len(selection.subtasks)} subtasks")
    if selection.checkpoints:
        parts.append("checkpoints " + ", ".join(f"{n}={w:.3g}" for n, w in zip(selection.checkpoints,
                                                                               selection.weights)))
    for step in selection.report.get("filters", []):
        parts.append(f"filter {step['score']} {step['keep']} q{step['quantile']:g} "
                     f"(threshold {step['threshold']:.4g}, {step['pool']} left)")
    return f"selected {len(selection)} of {selection.pool} examples ({'; '.join(parts)})"


def _add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the datastores under a folder over HTTP",
        description="Run the REST service over every datastore in --root (one sub-folder each). "
                    "Every setting can also come from a GRADSTORE_* environment variable (GRADSTORE_ROOT, "
                    "GRADSTORE_API_KEYS=key1,key2, ...); flags given here take precedence.",
    )
    p.add_argument("--root", type=Path, help="folder holding the datastores (or GRADSTORE_ROOT)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="accepted API key; repeat for several")
    p.add_argument("--api-key-file", type=Path, metavar="FILE", help="file with one accepted API key per line")
    p.add_argument("--no-auth", action="store_true", default=None, dest="auth_disabled",
                   help="serve without authentication (otherwise at least one API key is required)")
    p.add_argument("--verify-checksums", action="store_true", default=None, dest="verify_checksums",
                   help="check every file's SHA-256 when a store is opened (reads the whole store; without it "
                        "sizes, Parquet footers and the index are checked)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from gradstore.service.app import create_app
    from gradstore.service.settings import ConfigurationError, Settings

    given = {key: getattr(args, key)
             for key in ("root", "host", "port", "api_keys", "api_key_file", "auth_disabled", "verify_checksums")
             if getattr(args, key) is not None}
    try:
        settings = Settings(**given)
        app = create_app(settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"gradstore serve: {problems} (flags or GRADSTORE_* variables)", file=sys.stderr)
        return EXIT_USAGE
    except ConfigurationError as exc:
        print(f"gradstore serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="compare strategies: fine-tune on each one's selection and on everything",
        formatter_class=DefaultsHelpFormatter,
        description="Select a fraction of a datastore with each strategy, then fine-tune a fresh LoRA on the base "
                    "model the store was built with: on each selection (several seeds; a seeded strategy such as "
                    "random draws once per seed) and on the whole pool; evaluate each, and the base model, on "
                    "held-out records of the target task (mean answer-token loss, exact-match accuracy of "
                    "greedy generation against each record's 'answer') and print one row per strategy.",
    )
    p.add_argument("--store", required=True, type=Path, help="datastore folder of the training pool")
    p.add_argument("--targets", required=True, type=Path, metavar="FILE",
                   help="target records (JSONL or Parquet, corpus format)")
    p.add_argument("--heldout", required=True, type=Path, metavar="FILE",
                   help="held-out records of the target task, each with an 'answer' field (else its last "
                        "assistant message is the answer)")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the pool each strategy selects")
    p.add_argument("--strategies", type=_strategy_specs, default="less,random", metavar="NAME[:VALUE],...",
                   help="strategies to compare: NAME, NAME:VALUE (the strategy's main option: quality:effective_rank, "
                        "random:3) or NAME:KEY=VALUE;KEY=VALUE (quality:score=nuclear_norm;order=low)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], metavar="0,1,2",
                   help="fine-tuning seeds of every strategy's arm")
    p.add_argument("--no-full", action="store_true", help="leave out fine-tuning on the whole pool")
    p.add_argument("--full-seeds", type=_seeds, default=None, metavar="0",
                   help="seeds of the whole-pool arm (default: the first of --seeds)")
    # LESS's fine-tuning settings by default, as for the warmup; a tiny model needs a higher learning rate.
    p.add_argument("--epochs", type=int, default=4, help="epochs of the selected and random arms")
    p.add_argument("--full-epochs", type=int, default=1, help="epochs of the whole-pool arm")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=float, default=512.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated target modules, or all-linear (default: PEFT's for the model)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the store's)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per held-out record")
    p.add_argument("--family-field", metavar="NAME",
                   help="record field naming an example's task family, for the selection's precision")
    p.add_argument("--target-family", metavar="NAME",
                   help="the target task's family (default: the targets' common --family-field value)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the result as JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_eval)


def _strategy_specs(text: str) -> list[dict]:
    """``less,quality:effective_rank,random``: comma-separated strategies; inside one, options by
    name are separated by ``;`` (``quality:score=nuclear_norm;order=low``)."""
    from gradstore.evaluate import parse_strategy
    from gradstore.selection.errors import SelectionError

    try:
        return [parse_strategy(item.replace(";", ",")) for item in _names(text)]
    except SelectionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def _run_eval(args) -> int:
    from gradstore.evaluate import compare, format_table, to_json
    from gradstore.indexer.corpus import CorpusSource, read_corpus
    from gradstore.indexer.finetune import FinetuneSettings

    targets = [r.record for r in read_corpus([CorpusSource.parse(str(args.targets))]).records]
    heldout = [r.record for r in read_corpus([CorpusSource.parse(str(args.heldout))]).records]
    target_family = args.target_family
    if args.family_field is not None and target_family is None:
        families = {str(r.get(args.family_field)) for r in targets}
        if len(families) != 1 or None in (r.get(args.family_field) for r in targets):
            print(f"gradstore eval: the targets do not share one {args.family_field!r} value; give --target-family",
                  file=sys.stderr)
            return EXIT_USAGE
        target_family = families.pop()
    settings = FinetuneSettings(
        epochs=args.epochs, learning_rate=args.learning_rate, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=_lora_targets(args.lora_targets), batch_size=args.batch_size,
    )
    result = compare(
        args.store, targets, heldout, fraction=args.fraction, strategies=args.strategies, seeds=args.seeds,
        include_full=not args.no_full,
        full_seeds=args.full_seeds, settings=settings, full_epochs=args.full_epochs, max_length=args.max_length,
        max_new_tokens=args.max_new_tokens, family_field=args.family_field, target_family=target_family,
        device=args.device, progress=not args.no_progress, log=lambda line: print(line, file=sys.stderr),
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(result))
        print(f"result written to {args.json}", file=sys.stderr)
    print(format_table(result))
    return 0


def _lora_targets(text: str | None) -> tuple[str, ...] | str | None:
    return "all-linear" if text == "all-linear" else _split_targets(text)


def build_parser() -> argparse.ArgumentParser:
    from gradstore import __version__, report
    from gradstore.datastore import commands as store_commands

    parser = argparse.ArgumentParser(
        prog="gradstore",
        description="Gradient datastore and LESS-style data selection for instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradstore {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    _add_warmup_parser(subparsers)
    _add_index_parser(subparsers)
    _add_convert_optimizer_parser(subparsers)
    _add_info_parser(subparsers)
    store_commands.add_parsers(subparsers)
    _add_select_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_eval_parser(subparsers)
    report.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        print(missing_module_message(args.command, exc.name or str(exc)), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn known errors into one clear line
        if isinstance(exc, _UsageError):
            parser.exit(EXIT_USAGE, f"gradstore: error: {exc}\n")
        if _is_gradstore_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        raise


# The extras the README tells users to install; the others (indexer, service) are parts of cpu and gpu.
USER_EXTRAS = ("cpu", "gpu", "datasets")


def missing_module_message(command: str, module: str) -> str:
    """One line for a subcommand that failed to import ``module``.

    A ``gradstore.*`` module is part of this distribution, so its absence means a broken
    installation (or a wheel built without it), not a missing extra. Any other module is looked up
    in the installed distribution's requirements (``Requires-Dist``): a dependency of an extra is
    named with the extras that bring it; a module that no requirement provides is a dependency of
    a dependency; a missing sub-module of an installed package means a version that does not fit.
    """
    import importlib.util

    if module == "gradstore" or module.startswith("gradstore."):
        import gradstore

        return (f"gradstore {command}: this gradstore installation is incomplete: the module {module!r} is missing "
                f"from {Path(gradstore.__file__).parent}; reinstall gradstore (pip install --force-reinstall "
                f"--no-deps gradstore, or the wheel you installed with --force-reinstall --no-deps); a wheel "
                f"that still lacks it was built incomplete")
    top = module.split(".")[0]
    if top != module and importlib.util.find_spec(top) is not None:
        return (f"gradstore {command}: the installed {top!r} has no module {module!r}: a version gradstore does not "
                f"support, or a broken install; reinstall the extras you use, e.g. pip install --force-reinstall "
                f"'gradstore[cpu]'")
    distributions, extras = _extras_providing(top)
    if not extras:
        return (f"gradstore {command}: missing module {module!r}, which is not one of gradstore's own requirements: "
                f"a dependency of an installed package is missing or broken; reinstall the extras you use, e.g. "
                f"pip install --force-reinstall 'gradstore[cpu]'")
    commands = " or ".join(f"pip install 'gradstore[{extra}]'" for extra in extras)
    return (f"gradstore {command}: missing dependency {module!r} ({' or '.join(distributions)}, from the "
            f"{' or '.join(repr(e) for e in extras)} extra); install it: {commands}")


def _extras_providing(module: str) -> tuple[list[str], list[str]]:
    """The distributions that provide the import name ``module`` among gradstore's requirements,
    and the user extras (:data:`USER_EXTRAS`) that bring one of them, directly or through another
    extra. ``faiss`` is provided by ``faiss-cpu`` and ``faiss-gpu``; otherwise a distribution's
    name is its module's with ``-`` for ``_``."""
    import importlib.metadata
    import re

    try:
        requirements = importlib.metadata.requires("gradstore") or []
    except importlib.metadata.PackageNotFoundError:
        return [], []
    direct: dict[str, set[str]] = {}  # extra -> distribution names it lists
    includes: dict[str, set[str]] = {}  # extra -> extras of gradstore it lists
    for text in requirements:
        found = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?[^;]*;.*\bextra\s*==\s*['\"]([^'\"]+)['\"]", text)
        if not found:
            continue
        name, listed, extra = found.group(1).lower().replace("_", "-"), found.group(2), found.group(3)
        if name == "gradstore":
            includes.setdefault(extra, set()).update(e.strip() for e in (listed or "").split(","))
        else:
            direct.setdefault(extra, set()).add(name)
    wanted = module.lower().replace("_", "-")
    distributions = sorted({d for names in direct.values() for d in names
                            if d == wanted or (wanted == "faiss" and d in ("faiss-cpu", "faiss-gpu"))})

    def brings(extra: str, seen: frozenset = frozenset()) -> bool:
        return bool(direct.get(extra, set()) & set(distributions)) or any(
            brings(other, seen | {extra}) for other in includes.get(extra, ()) if other not in seen)

    return distributions, [extra for extra in USER_EXTRAS if brings(extra)]


def _is_gradstore_error(exc: BaseException) -> bool:
    indexer_errors = sys.modules.get("gradstore.indexer.errors")
    selection_errors = sys.modules.get("gradstore.selection.errors")
    store_errors = sys.modules.get("gradstore.datastore.errors")
    return ((indexer_errors is not None and isinstance(exc, indexer_errors.IndexerError))
            or (store_errors is not None and isinstance(exc, store_errors.StoreError))
            or (selection_errors is not None and isinstance(exc, selection_errors.SelectionError)))


if __name__ == "__main__":
    sys.exit(main())
