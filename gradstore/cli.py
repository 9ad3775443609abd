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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compute per-example projected LoRA gradients of a corpus at one or more checkpoints "
                    "and write them as a datastore (Parquet features + FAISS index + manifest.json). "
                    "Re-running the same command resumes an interrupted job.",
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument("--corpus", action="append", required=True, metavar="[NAME=]PATH",
                    help="corpus file (JSONL, Parquet) or datasets save_to_disk folder; repeat for several "
                         "sources; NAME defaults to the file stem")
    io.add_argument("--model", required=True, type=Path, help="local folder of a Hugging Face causal LM")
    io.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder)")
    io.add_argument("--out", required=True, type=Path, help="datastore folder to create")
    io.add_argument("--overwrite", action="store_true", help="replace an existing datastore at --out")
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
    run.add_argument("--max-tokens-per-batch", type=int, default=16384,
                     help="token budget of a batch (padded length x examples)")
    run.add_argument("--max-batch-size", type=int, default=64, help="most examples in a batch")
    run.add_argument("--shard-size", type=int, default=1024,
                     help="examples per shard (the unit of resumption and of multi-process work)")
    run.add_argument("--index", default="auto",
                     help="FAISS index: auto, flat, sq16, ivf, ivf-ondisk (IVF built in parts, its lists "
                          "merged on disk into index.ivfdata: for stores whose index does not fit in memory), "
                          "hnsw or none; auto takes flat, else sq16, else ivf-ondisk, whichever fits "
                          "--index-memory")
    run.add_argument("--index-memory", type=_size, default="4GiB",
                     help="memory budget steering --index auto and bounding an ivf-ondisk build (e.g. 4GiB)")
    run.add_argument("--no-raw-features", action="store_true",
                     help="write the features as Parquet only: half the feature bytes on disk, but selection "
                          "scans decode Parquet (about 6x slower) instead of memory-mapping raw fp16 matrices")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--progress-file", type=Path, metavar="PATH",
                     help="keep a JSON progress report here: done, total, examples_per_second, eta_seconds, "
                          "phase (for supervisors such as the service's job runner)")
    p.set_defaults(handler=_run_index)


def _run_index(args) -> int:
    from gradstore.indexer.checkpoints import CheckpointSpec
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.model import LoraSpec
    from gradstore.indexer.projection import ProjectionSpec

    targets = _split_targets(args.lora_targets)
    checkpoints = [CheckpointSpec.parse(spec) for spec in args.checkpoint]
    if args.run is not None:
        from gradstore.indexer.warmup import read_run_manifest

        if checkpoints:
            raise SystemExit("gradstore index: give --run or --checkpoint, not both")
        checkpoints = read_run_manifest(args.run)
    config = IndexJobConfig(
        corpus=[CorpusSource.parse(spec) for spec in args.corpus],
        model=args.model, out=args.out, tokenizer=args.tokenizer,
        checkpoints=checkpoints,
        lora=LoraSpec(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets, init_seed=args.seed),
        gradient_type=args.gradient_type,
        projection=ProjectionSpec(kind=args.projection, dim=args.proj_dim, seed=args.seed,
                                  nonzeros=args.proj_nonzeros),
        max_length=args.max_length, template=args.template,
        max_tokens_per_batch=args.max_tokens_per_batch, max_batch_size=args.max_batch_size,
        shard_size=args.shard_size, dtype=args.dtype, device=args.device, index=args.index,
        index_memory_budget=args.index_memory, raw_features=not args.no_raw_features,
        on_bad_record=args.on_bad_record,
        overwrite=args.overwrite, restart=args.restart, progress=not args.no_progress,
        progress_file=args.progress_file,
    )
    try:
        summary = IndexJob(config, log=lambda line: print(line, file=sys.stderr)).run()
    except OSError as err:
        # A system error the job does not translate itself: still one line naming the file.
        from gradstore.indexer.datastore import os_reason

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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
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


def _add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a datastore",
                              description="Print a datastore's manifest summary (or the manifest as JSON).")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    p.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    from gradstore.indexer.datastore import Datastore

    store = Datastore.open(args.store, verify=args.verify)
    m = store.manifest
    if args.json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return 0
    print(f"datastore     {store.path}")
    print(f"examples      {m.counts.examples:,} ({m.counts.skipped:,} skipped, {m.counts.truncated:,} truncated)")
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
    print(f"tokens        {m.tokens.get('total', 0):,} (mean {m.tokens.get('mean', 0):.1f}, "
          f"max {m.tokens.get('max', 0)})")
    size = sum(f.bytes for f in m.files.values())
    print(f"size          {size / 2**20:,.1f} MiB in {len(m.files)} files")
    if args.verify:
        print("checksums     ok")
    return 0


def _add_select_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "select", help="select the training examples that matter most for a target task",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score every example of a datastore against target examples with LESS "
                    "(sum over checkpoints of w_c * cos(train_c, target_c), aggregated over the targets) and "
                    "print the ranked selection. Targets come from an sgd datastore of target examples "
                    "(--targets-store) or from target records (--targets), whose gradients are then computed "
                    "with the datastore's own model, checkpoints and projection.",
    )
    p.add_argument("store", type=Path, help="datastore folder of the training pool")
    targets = p.add_mutually_exclusive_group(required=True)
    targets.add_argument("--targets-store", type=Path, metavar="DIR",
                         help="datastore of the target examples (gradstore index --gradient-type sgd)")
    targets.add_argument("--targets", type=Path, metavar="FILE",
                         help="target records (JSONL or Parquet, corpus format)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--k", type=int, metavar="N", help="select the top N examples")
    budget.add_argument("--fraction", type=float, metavar="F", help="select the top ceil(F x pool) examples")
    p.add_argument("--aggregation", default="less", choices=["less", "max", "mean"],
                   help="less: mean within each subtask, then max across subtasks; max / mean over all targets")
    p.add_argument("--subtask-field", metavar="NAME",
                   help="record field naming each target's subtask (default: one subtask)")
    p.add_argument("--sources", type=_names, metavar="A,B", help="only examples of these corpus sources")
    p.add_argument("--per-source-cap", type=int, metavar="N", help="at most N examples per source")
    p.add_argument("--dedup-threshold", type=float, metavar="X",
                   help="skip a candidate whose similarity to an already selected example exceeds X")
    p.add_argument("--checkpoints", type=_names, metavar="A,B", help="checkpoints to use (default: all)")
    p.add_argument("--weights", type=_checkpoint_weights, metavar="A=W,B=W",
                   help="checkpoint weights instead of the manifest's (normalised to sum to 1)")
    p.add_argument("--export", type=Path, metavar="OUT.jsonl|OUT.parquet",
                   help="write the selected records, in their original form and rank order")
    p.add_argument("--scores", type=Path, metavar="OUT.parquet",
                   help="write the whole pool's ranked scores (rank, row, id, source, score, score_<subtask>)")
    p.add_argument("--json", action="store_true", help="print one JSON object per selected example")
    p.add_argument("--device", default="auto", help="where target gradients are computed (with --targets)")
    p.set_defaults(handler=_run_select)


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
    from gradstore.indexer.datastore import Datastore
    from gradstore.selection import SelectionEngine, SelectionOptions, TargetSet

    store = Datastore.open(args.store)
    engine = SelectionEngine(store)
    options = SelectionOptions(
        aggregation=args.aggregation, k=args.k, fraction=args.fraction, sources=args.sources,
        per_source_cap=args.per_source_cap, dedup_threshold=args.dedup_threshold,
        checkpoints=args.checkpoints, weights=args.weights,
    )
    # Refuse a bad query before computing any target gradient.
    options.validate()
    engine.pool(options.sources)
    engine.resolve_checkpoints(options.checkpoints, options.weights)
    if args.targets_store is not None:
        targets = TargetSet.from_datastore(Datastore.open(args.targets_store), args.subtask_field)
    else:
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
    print(f"selected {len(selection)} of {selection.pool} examples ({targets.num_targets} targets, "
          f"{len(selection.subtasks)} subtasks, aggregation {selection.aggregation}, checkpoints "
          f"{', '.join(f'{n}={w:.3g}' for n, w in zip(selection.checkpoints, selection.weights))})", file=sys.stderr)
    return 0


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
        "eval", help="measure a selection: fine-tune on it, on a random subset and on everything",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Select the top fraction of a datastore for the target examples, then fine-tune a fresh LoRA "
                    "on the base model the store was built with: on the selection, on a random subset of the "
                    "same size (one per seed) and on the whole pool; evaluate each, and the base model, on "
                    "held-out records of the target task (mean answer-token loss, exact-match accuracy of "
                    "greedy generation against each record's 'answer') and print the table.",
    )
    p.add_argument("--store", required=True, type=Path, help="datastore folder of the training pool")
    p.add_argument("--targets", required=True, type=Path, metavar="FILE",
                   help="target records (JSONL or Parquet, corpus format)")
    p.add_argument("--heldout", required=True, type=Path, metavar="FILE",
                   help="held-out records of the target task, each with an 'answer' field (else its last "
                        "assistant message is the answer)")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the pool to select")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], metavar="0,1,2",
                   help="fine-tuning seeds of the selected and random arms (one random subset per seed)")
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
        args.store, targets, heldout, fraction=args.fraction, seeds=args.seeds, include_full=not args.no_full,
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

    parser = argparse.ArgumentParser(
        prog="gradstore",
        description="Gradient datastore and LESS-style data selection for instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradstore {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_warmup_parser(subparsers)
    _add_index_parser(subparsers)
    _add_info_parser(subparsers)
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
        print(f"gradstore {sys.argv[1] if len(sys.argv) > 1 else ''}: missing dependency {exc.name!r}; "
              "install the extras: pip install 'gradstore[cpu]' (or [gpu])", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn known errors into one clear line
        if _is_gradstore_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        raise


def _is_gradstore_error(exc: BaseException) -> bool:
    indexer_errors = sys.modules.get("gradstore.indexer.errors")
    selection_errors = sys.modules.get("gradstore.selection.errors")
    return ((indexer_errors is not None and isinstance(exc, indexer_errors.IndexerError))
            or (selection_errors is not None and isinstance(exc, selection_errors.SelectionError)))


if __name__ == "__main__":
    sys.exit(main())
