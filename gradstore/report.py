"""``gradstore report``: the web UI's views of a datastore, and of a selection, as one HTML file.

The file is self-contained (the data, the UI's stylesheet and scripts and the vendored uPlot are
inlined; nothing is fetched) so it opens offline, from a notebook, a mail or a CI artifact. It
holds the same views as the web UI, computed by the same code
(``gradstore.selection.overview``):

- the datastore: description, checkpoints and weights, examples per source, histograms of token
  length, loss, gradient norm and the stored quality scores;
- an example browser over the first ``--examples`` examples (search by id and text among those);
- with ``--selection FILE``: the ranked list (the first ``--records`` with their records), the
  composition per source against the store, the score histogram with the cut-off, the
  per-subtask breakdown and the 2-D map of the pool with the selection marked (and the targets,
  with ``--targets-store``).

``--selection FILE`` is what ``gradstore select --json`` prints (one selected example per line:
``rank``, ``row``, ``id``, ``source``, ``score``, ``subtask_scores``; ``SelectedExample`` of the
SDK, as ``item.model_dump_json()`` writes it). ``--scores FILE`` is the Parquet file
``gradstore select --scores`` writes (the whole pool's ranked scores): with it the score
histogram shows the whole pool with the selection and its cut-off, without it the selection's
scores alone. The pool a selection is compared with is the whole store, or the sources of
``--pool-sources``.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from gradstore.selection.errors import SelectionError

REPORT_SCRIPTS = ("vendor/uPlot.iife.min.js", "js/views.js", "js/report.js")
REPORT_STYLES = ("vendor/uPlot.min.css", "style.css")
DEFAULT_EXAMPLES = 200
DEFAULT_RECORDS = 500
MAP_SAMPLE = 2000


class ReportError(SelectionError):
    """A report input that cannot be used (names the file and line)."""


def read_selection(path: Path) -> list[dict]:
    """The selected examples of a ``gradstore select --json`` file, checked, in rank order."""
    from gradstore.client.models import SelectedExample

    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ReportError(f"{path}: cannot read the selection ({err.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(SelectedExample.model_validate_json(line).model_dump())
        except ValueError as err:
            first = str(err).splitlines()
            raise ReportError(f"{path}:{number}: not a selected example of `gradstore select --json` "
                              f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    if not items:
        raise ReportError(f"{path}: no selected example in the file")
    return sorted(items, key=lambda item: item["rank"])


def read_pool_scores(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["score"])
    except (OSError, KeyError, ValueError) as err:
        raise ReportError(f"{path}: not a scores file of `gradstore select --scores` ({err})") from None
    return table.column("score").to_numpy()


def build_report(store_path: Path, out: Path, selection: Path | None = None, scores: Path | None = None,
                 targets_store: Path | None = None, examples: int = DEFAULT_EXAMPLES,
                 records: int = DEFAULT_RECORDS, targets=None) -> Path:
    """Write the report of ``store_path`` (and of a selection) to ``out``; returns ``out``.
    ``targets`` (a ``TargetSet``, instead of ``targets_store``) marks the targets on the map."""
    data = report_data(store_path, selection, scores, targets_store, examples, records, targets)
    out.write_text(render_html(data), encoding="utf-8")
    return out


def report_data(store_path: Path, selection: Path | None, scores: Path | None, targets_store: Path | None,
                examples: int, records: int, targets=None) -> dict:
    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine, TargetSet
    from gradstore.selection.overview import (datastore_detail, example_model, example_page, pool_map, store_stats,
                                              summarize, with_scores)

    store = Datastore.open(store_path)
    engine = SelectionEngine(store)
    name = store_path.resolve().name
    data = {
        "datastore": name,
        "detail": datastore_detail(name, store.manifest).model_dump(mode="json"),
        "stats": store_stats(engine, name).model_dump(mode="json"),
        "examples": example_page(engine, name, 0, examples).model_dump(mode="json"),
    }
    if selection is None:
        data["map"] = pool_map(engine, name, MAP_SAMPLE).model_dump(mode="json")
        return data
    items = read_selection(selection)
    last = store.num_rows - 1
    for item in items:
        if not 0 <= item["row"] <= last:
            raise ReportError(f"{selection}: rank {item['rank']} has row {item['row']}, which datastore {name!r} "
                              f"does not have (0..{last}): is it a selection of this store?")
    ids, _ = engine.ids_and_sources([item["row"] for item in items])
    for item, stored in zip(items, ids):
        if stored != item["id"]:
            raise ReportError(f"{selection}: rank {item['rank']} is {item['id']!r}, but row {item['row']} of "
                              f"datastore {name!r} is {stored!r}: is it a selection of this store?")
    subtasks = list(items[0]["subtask_scores"])
    odd = next((item for item in items if list(item["subtask_scores"]) != subtasks), None)
    if odd is not None:
        raise ReportError(f"{selection}: rank {odd['rank']} has the subtasks {list(odd['subtask_scores'])}, rank 1 "
                          f"has {subtasks}: one selection has the same subtasks throughout")
    if targets_store is not None:
        targets = TargetSet.from_datastore(Datastore.open(targets_store), None)
    shown = with_scores(engine, [example_model(store.example(item["row"])) for item in items[:records]])
    summary = summarize(name, None, pool=store.num_examples, pool_sources=dict(store.manifest.counts.by_source),
                        selected_sources=[item["source"] for item in items],
                        pool_scores=None if scores is None else read_pool_scores(scores),
                        selected_scores=[item["score"] for item in items], subtasks=subtasks,
                        targets=[None] * len(subtasks),
                        subtask_scores=[[item["subtask_scores"][s] for s in subtasks] for item in items])
    data["selection"] = {
        "file": selection.name,
        "items": items,
        "records": {example.id: example.model_dump(mode="json") for example in shown},
        "summary": summary.model_dump(mode="json"),
        "map": pool_map(engine, name, MAP_SAMPLE, rows=[item["row"] for item in items[:MAP_SAMPLE]],
                        targets=targets).model_dump(mode="json"),
    }
    return data


def render_html(data: dict) -> str:
    """The report page: the UI's styles and scripts inlined, the data as a JSON script element."""
    static = resources.files("gradstore.service").joinpath("static", "ui")
    styles = "\n".join(static.joinpath(*path.split("/")).read_text(encoding="utf-8") for path in REPORT_STYLES)
    scripts = "\n".join(f"<script>\n{_script_safe(static.joinpath(*path.split('/')).read_text(encoding='utf-8'))}\n"
                        f"</script>" for path in REPORT_SCRIPTS)
    payload = _script_safe(json.dumps(data, ensure_ascii=True, allow_nan=False))
    title = f"gradstore report: {data['datastore']}"
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_escape(title)}</title>\n<style>\n{styles}\n</style>\n</head>\n<body>\n"
            f'<header class="top"><span class="brand">gradstore report</span>'
            f'<span class="muted" id="version"></span></header>\n<main id="main"></main>\n'
            f'<script type="application/json" id="report-data">{payload}</script>\n{scripts}\n</body>\n</html>\n')


def _script_safe(text: str) -> str:
    """Text that cannot end the <script> element it is inlined in."""
    return text.replace("</", "<\\/")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- command line -------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a datastore or a selection",
        description="The web UI's views of a datastore (and of a selection from `gradstore select`) as one "
                    "HTML file that works offline.")
    p.add_argument("store", type=Path, help="datastore folder")
    p.add_argument("--selection", type=Path, metavar="FILE",
                   help="the selected examples: what `gradstore select --json` prints (JSON lines)")
    p.add_argument("--scores", type=Path, metavar="FILE.parquet",
                   help="the pool's scores from `gradstore select --scores`, for the score histogram")
    p.add_argument("--targets-store", type=Path, metavar="DIR", help="an sgd datastore of the targets, to mark them "
                                                                    "on the map")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="examples in the example browser")
    p.add_argument("--records", type=int, default=DEFAULT_RECORDS, help="selected examples shown with their records")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="REPORT.html", help="the file to write")
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.scores is not None and args.selection is None:
        raise ReportError("--scores needs --selection (the scores are those of a selection)")
    if args.targets_store is not None and args.selection is None:
        raise ReportError("--targets-store needs --selection")
    for flag in ("examples", "records"):
        if getattr(args, flag) < 0:
            raise ReportError(f"--{flag} must be >= 0")
    out = build_report(args.store, args.out, args.selection, args.scores, args.targets_store, args.examples,
                       args.records)
    print(f"report written to {out}", file=sys.stderr)
    return 0

