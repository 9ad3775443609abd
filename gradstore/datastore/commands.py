"""The CLI commands that change or inspect a store's versions: ``remove``, ``compact``, ``prune``,
``quantize``, ``versions``, ``migrate`` (registered by ``gradstore.cli``; each prints what it did)."""

from __future__ import annotations

from pathlib import Path

from .layout import DEFAULT_KEEP_VERSIONS, QUANTIZATION_CHOICES


def add_parsers(subparsers) -> None:
    from gradstore.cli import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "remove", help="mark examples of a datastore removed (a new version)",
        formatter_class=DefaultsHelpFormatter,
        description="Mark the examples of a source, or of the ids listed in a file, removed, as the store's next "
                    "version: selections, searches and id lookups leave them out; their data stays until "
                    "`gradstore compact`. Readers switch to the new version without a restart.")
    p.add_argument("store", type=Path, help="datastore folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", help="remove every example of this source (corpus name)")
    which.add_argument("--ids", type=Path, metavar="FILE", help="remove the examples whose ids are listed, one per line")
    p.set_defaults(handler=_run_remove)

    p = subparsers.add_parser(
        "compact", help="rewrite a datastore's live examples into one segment (a new version)",
        formatter_class=DefaultsHelpFormatter,
        description="Write the live examples into one new segment (rows renumbered 0..N-1, removed examples "
                    "gone, the index rebuilt) as the store's next version, then delete what the last "
                    "--keep-versions versions do not use.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS,
                   help="versions whose files are kept (the current one and the ones before it), so that "
                        "queries that started on them finish")
    p.set_defaults(handler=_run_compact)

    p = subparsers.add_parser(
        "prune", help="delete the files old versions of a datastore alone use",
        formatter_class=DefaultsHelpFormatter,
        description="Delete data files and version manifests that none of the last --keep-versions versions uses.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS, help="versions whose files are kept")
    p.set_defaults(handler=_run_prune)

    p = subparsers.add_parser(
        "quantize", help="add a quantised copy of a datastore's features (a new version)",
        formatter_class=DefaultsHelpFormatter,
        description="Add an int8 (k + 4 bytes per example and checkpoint) or 1-bit (k/8 + 4 bytes) copy of every "
                    "feature, QLESS-style: a compact copy for tools and scans that trade a little agreement with "
                    "fp16 for memory (`gradstore select --precision int8|1bit` scores from it; "
                    "Datastore.quantized_features reads it; measured agreement with fp16 selections: "
                    "bench/RESULTS.md, 'Quantised features'). Appends and compactions keep it up to date.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--kind", required=True, choices=QUANTIZATION_CHOICES, help="the codes")
    p.set_defaults(handler=_run_quantize)

    p = subparsers.add_parser("versions", help="list a datastore's versions",
                              description="How the store came to be: one line per version (what it did, when, rows "
                                          "added and removed), the current one last.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.set_defaults(handler=_run_versions)

    p = subparsers.add_parser(
        "migrate", help="convert a schema version 1 datastore to the current format",
        formatter_class=DefaultsHelpFormatter,
        description="Rewrite a store written before datastore versions (schema version 1) in the current format, "
                    "in place: the same rows, features bit for bit, one stored copy of them; a Flat index is "
                    "dropped (exact searches scan the features) and an approximate one rebuilt.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.set_defaults(handler=_run_migrate)


def _run_remove(args) -> int:
    from .versions import remove

    ids = None
    if args.ids is not None:
        try:
            ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise SystemExit(f"gradstore remove: cannot read --ids {args.ids}: {err.strerror}") from None
    manifest = remove(args.store, source=args.source, ids=ids)
    entry = manifest.history[-1]
    print(f"{args.store}: version {manifest.version}: {entry.rows_removed:,} examples removed, "
          f"{manifest.counts.examples:,} live ({manifest.counts.removed:,} removed in all; `gradstore compact` "
          f"reclaims their space)")
    return 0


def _run_compact(args) -> int:
    from .versions import compact

    before = _size(args.store)
    manifest = compact(args.store, keep_versions=args.keep_versions)
    print(f"{args.store}: version {manifest.version}: {manifest.counts.examples:,} examples in one segment; "
          f"{before / 2**20:,.1f} MiB -> {_size(args.store) / 2**20:,.1f} MiB on disk")
    return 0


def _run_prune(args) -> int:
    from .versions import prune

    deleted = prune(args.store, keep=args.keep_versions)
    print(f"{args.store}: {len(deleted)} files deleted")
    return 0


def _run_quantize(args) -> int:
    from .versions import quantize

    manifest = quantize(args.store, args.kind)
    added = sum(info.bytes for path, info in manifest.files.items() if f"/quantized/{args.kind}/" in path)
    print(f"{args.store}: version {manifest.version}: {args.kind} copy of the features added "
          f"({added / 2**20:,.1f} MiB)")
    return 0


def _run_versions(args) -> int:
    from .manifest import Manifest

    manifest = Manifest.load(args.store)
    for entry in manifest.history:
        current = "  (current)" if entry.version == manifest.version else ""
        print(f"v{entry.version:<5} {entry.at}  {entry.action:<8} +{entry.rows_added:,} -{entry.rows_removed:,}{current}")
    return 0


def _run_migrate(args) -> int:
    from .migrate import migrate

    manifest = migrate(args.store)
    print(f"{args.store}: migrated to schema version {manifest.schema_version}: {manifest.counts.examples:,} "
          f"examples, index {manifest.index.kind if manifest.index else 'none (exact scans)'}")
    if "config" not in manifest.settings:
        print(f"{args.store}: its version 1 manifest does not describe every indexing setting; appends to it "
              "need every setting given (--model, --checkpoint or --run, --proj-dim, ...)")
    return 0


def _size(store: Path) -> int:
    return sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
