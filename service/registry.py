"""The datastores a service serves, and the selections it keeps for paging.

:class:`DatastoreRegistry` maps names to the stores under the service root: every immediate
sub-folder holding a ``manifest.json`` is a store named by its folder. Stores are opened on first
use and kept as a :class:`StoreHandle` (the :class:`Datastore`, its FAISS index, a
:class:`SelectionEngine` and, once target records are sent, a target featurizer with the store's
model), which also answers nearest-neighbour queries. A store that fails to open is reported with
its reason while the others keep working; so is one damaged while it is served (a shard truncated
or removed): a route that fails on it has the store checked again (:meth:`recheck`) and answers
503 with the reason, as do all the routes of that store from then on. A store replaced on disk (a job republished it) is
reopened on its next use, and a new one is found without restart.

Opening a store checks what is cheap whatever its size: the manifest, every listed file's size,
every Parquet footer (readable, row counts and feature dimension as the manifest says) and the
FAISS index (readable, one vector per example). Hashing every file against the manifest's sha256
reads the whole store (minutes for 100 GB), so it runs only with ``verify_checksums``.

:class:`SelectionCache` is the bounded LRU of finished selections that cursors page through.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from gradstore.client.models import DATASTORE_NAME_MAX_LENGTH, DATASTORE_NAME_PATTERN, StoreState
from gradstore.datastore import MANIFEST_FILE, Datastore, Manifest
from gradstore.indexer.errors import StoreError
from gradstore.indexer.faiss_index import RESCORED_CANDIDATES, concat_weighted, prefer_blas_search

from gradstore.selection import Selection, SelectionEngine, TargetSet, rank
from .errors import ServiceError

# Candidates whose features are gathered at once when re-scoring a search: float32 rows of
# checkpoints × k (128 MiB at 4 × 8192).
_RESCORE_ROWS = 1024

if TYPE_CHECKING:  # loading it pulls in torch: only when a query sends target records
    from gradstore.selection import TargetFeaturizer

NAME_PATTERN = re.compile(DATASTORE_NAME_PATTERN)


def check_name(name: str) -> None:
    """400 ``invalid_name`` for anything but a plain datastore name (``client.models``'s pattern)."""
    if not isinstance(name, str) or len(name) > DATASTORE_NAME_MAX_LENGTH or not NAME_PATTERN.fullmatch(name):
        raise ServiceError(400, "invalid_name",
                           f"invalid datastore name {name!r}: use 1-{DATASTORE_NAME_MAX_LENGTH} letters, digits and "
                           f"._- starting with a letter or digit, without '..'",
                           {"name": name, "pattern": NAME_PATTERN.pattern})


def _signature(path: Path) -> tuple[int, int, int] | None:
    """Identity of a store's manifest (inode, mtime, size): it changes when a store is republished."""
    try:
        stat = (path / MANIFEST_FILE).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@dataclass
class StoreHandle:
    """One opened datastore with what the routes need of it."""

    name: str
    store: Datastore
    index: faiss.Index | None
    engine: SelectionEngine
    signature: tuple[int, int, int] | None
    _featurizer: TargetFeaturizer | None = field(default=None, repr=False)
    _featurizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    def featurizer(self) -> TargetFeaturizer:
        """The target featurizer with this store's model (loaded on first use, then kept)."""
        with self._featurizer_lock:
            if self._featurizer is None:
                from gradstore.selection import TargetFeaturizer

                self._featurizer = TargetFeaturizer(self.store)
            return self._featurizer

    # -- nearest neighbours: lists of (row, score), best first ---------------------------------

    def index_queries(self, targets: TargetSet) -> np.ndarray:
        """float32 ``(targets, k · checkpoints)``: the targets laid out like the index's vectors
        (all checkpoints, manifest weights), so an inner product is the weighted influence."""
        names = self.store.checkpoint_names
        self.engine.check_targets(targets, names)
        return np.atleast_2d(concat_weighted([targets.vectors[n] for n in names], self.store.weights))

    def row_vector(self, row: int) -> TargetSet:
        """A training example's own (unnormalised fp16) features as a one-target set."""
        vectors = {name: self.engine.features_at(name, [row]).astype(np.float32)
                   for name in self.store.checkpoint_names}
        return TargetSet(vectors, ["all"])

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Top ``k`` live rows per query through the FAISS index (which holds removed rows too:
        it is asked for that many more, and they are dropped). Where the index's codes lose
        precision it is asked for ``RESCORED_CANDIDATES`` times as many, which are scored
        exactly against the stored features and the best ``k`` kept: exact scores, and the
        neighbours the codes ranked just below."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        removed = self.store.removed_rows()
        factor = RESCORED_CANDIDATES.get(self.manifest.index.kind, 1)
        wanted = min(k * factor + len(removed), self.index.ntotal)
        if wanted == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.index.search(queries, wanted)
        live = self.store.is_live(np.maximum(rows, 0)) & (rows >= 0)
        if factor > 1:
            scores = self._exact_scores(queries, rows, live)
        results = []
        for found, values, alive in zip(rows, scores, live):
            found, values = found[alive], values[alive]
            best = np.lexsort((found, -values))[:k]
            results.append([(int(found[i]), float(values[i])) for i in best])
        return results

    def _exact_scores(self, queries: np.ndarray, rows: np.ndarray, live: np.ndarray) -> np.ndarray:
        """float32 like ``rows``: each live row's inner product with its query in the index's
        layout (``concat_c √w_c · f_c``), from the stored fp16 features; 0 elsewhere."""
        candidates = np.unique(rows[live])
        products = np.empty((len(candidates), len(queries)), dtype=np.float32)
        for first in range(0, len(candidates), _RESCORE_ROWS):
            block = candidates[first:first + _RESCORE_ROWS]
            vectors = concat_weighted([self.store.features_at(name, block) for name in self.store.checkpoint_names],
                                      self.store.weights)  # laid out as the index's vectors
            products[first:first + len(block)] = vectors @ queries.T
        exact = np.zeros(rows.shape, dtype=np.float32)
        query_of, column = np.nonzero(live)
        exact[query_of, column] = products[np.searchsorted(candidates, rows[query_of, column]), query_of]
        return exact

    def exact_search(self, targets: TargetSet, k: int, checkpoints: list[str] | None = None,
                     weights: dict[str, float] | None = None) -> list[list[tuple[int, float]]]:
        """Top ``k`` rows per target scored exactly by the engine (streaming the features)."""
        one_each = TargetSet(targets.vectors, [str(i) for i in range(targets.num_targets)], targets.origin)
        table = self.engine.scores(one_each, checkpoints, weights)
        rows = self.store.live_rows()
        results = []
        for column in range(targets.num_targets):
            scores = table.per_subtask[:, column]
            best = rank(rows, scores)[:k]
            results.append([(int(r), float(scores[r])) for r in best])
        return results


def open_handle(name: str, path: Path, verify_checksums: bool = False) -> StoreHandle:
    """Open a store, its index and its engine, checked as the module docstring says; raises
    :class:`StoreError`."""
    signature = _signature(path)
    store = Datastore.open(path, verify=verify_checksums)
    store.check_shards()
    try:
        index = store.index() if store.manifest.index is not None else None
    except RuntimeError as err:  # FAISS cannot parse the file
        raise StoreError(f"{path / store.manifest.index.file}: unreadable FAISS index ({err})") from None
    if index is not None and index.ntotal != store.num_rows:
        raise StoreError(f"{path / store.manifest.index.file}: {index.ntotal} vectors, the manifest says "
                         f"{store.num_rows} rows")
    return StoreHandle(name=name, store=store, index=index, engine=SelectionEngine(store),
                       signature=signature)


class DatastoreRegistry:
    """The stores under ``root``, opened lazily and cached; thread-safe."""

    def __init__(self, root: str | Path, verify_checksums: bool = False):
        prefer_blas_search()  # queries come in small batches of targets
        self.root = Path(root).resolve()
        self.verify_checksums = verify_checksums
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._handles: dict[str, StoreHandle] = {}
        self._errors: dict[str, str] = {}
        self._load_locks: dict[str, threading.Lock] = {}

    # -- names -------------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        """The folder of store ``name``; 400 ``invalid_name`` for anything but a plain name that
        stays inside the root."""
        check_name(name)
        path = self.root / name
        if not path.resolve().is_relative_to(self.root):
            raise ServiceError(400, "invalid_name", f"datastore {name!r} lies outside the service root",
                               {"name": name})
        return path

    def refresh(self) -> list[str]:
        """Rescan the root; forget stores that disappeared. Returns the sorted names."""
        found = set()
        if self.root.is_dir():
            for child in self.root.iterdir():
                if (NAME_PATTERN.fullmatch(child.name) and len(child.name) <= DATASTORE_NAME_MAX_LENGTH
                        and (child / MANIFEST_FILE).is_file()
                        and child.resolve().is_relative_to(self.root)):
                    found.add(child.name)
        with self._lock:
            for gone in self._names - found:
                self._handles.pop(gone, None)
                self._errors.pop(gone, None)
            self._names = found
        return sorted(found)

    def names(self) -> list[str]:
        return self.refresh()

    # -- stores ------------------------------------------------------------------------------

    def get(self, name: str) -> StoreHandle:
        """The opened store ``name``: 400 bad name, 404 no such store, 503 it cannot be opened."""
        path = self._existing(name)
        handle = self._cached(name, path)
        if handle is not None:
            return handle
        with self._load_lock(name):
            handle = self._cached(name, path)
            return handle if handle is not None else self._load(name, path)

    def manifest(self, name: str) -> Manifest:
        """The manifest of store ``name`` (file sizes checked, index not loaded; a store that failed
        to open is opened in full); errors as :meth:`get`."""
        path = self._existing(name)
        handle = self._cached(name, path)
        if handle is not None:
            return handle.manifest
        with self._lock:
            failed = name in self._errors
        if failed:  # its sizes may be right and its footers or index not: open it in full again
            return self.get(name).manifest
        try:
            return Datastore.open(path).manifest
        except StoreError as err:
            raise self._unavailable(name, str(err)) from None

    def _existing(self, name: str) -> Path:
        path = self.path_of(name)
        with self._lock:
            known = name in self._names
        if not known:
            self.refresh()
        if not (path / MANIFEST_FILE).is_file():
            raise ServiceError(404, "datastore_not_found", f"no datastore named {name!r}",
                               {"datastore": name})
        return path

    def _cached(self, name: str, path: Path) -> StoreHandle | None:
        with self._lock:
            handle = self._handles.get(name)
        return handle if handle is not None and handle.signature == _signature(path) else None

    def _load_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._load_locks.setdefault(name, threading.Lock())

    def _load(self, name: str, path: Path) -> StoreHandle:
        try:
            handle = open_handle(name, path, self.verify_checksums)
        except StoreError as err:
            raise self._unavailable(name, str(err)) from None
        with self._lock:
            self._names.add(name)
            self._handles[name] = handle
            self._errors.pop(name, None)
        return handle

    def _unavailable(self, name: str, message: str) -> ServiceError:
        """Record why store ``name`` cannot be opened; the 503 to answer."""
        reason = self._relative(message)
        self._forget(name, reason)
        return ServiceError(503, "datastore_unavailable", f"datastore {name!r} cannot be opened: {reason}",
                            {"datastore": name, "reason": reason})

    def _relative(self, message: str) -> str:
        return message.replace(f"{self.root}/", "")

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._handles)

    def states(self) -> list[StoreState]:
        """Every store under the root, opened (and its files re-checked) now: for readiness."""
        states = []
        for name in self.refresh():
            try:
                handle = self.get(name)
                Datastore.open(handle.store.path)  # files may have changed since it was opened
            except StoreError as err:
                self._unavailable(name, str(err))
            except ServiceError as err:
                if err.code == "datastore_not_found":
                    continue
            with self._lock:
                error = self._errors.get(name)
            states.append(StoreState(name=name, loaded=error is None, error=error))
        return states

    def recheck(self, names: list[str]) -> ServiceError | None:
        """After a route failed unexpectedly: the 503 of the first of ``names`` (then of every
        other opened store) whose files no longer pass the checks of opening it, now recorded
        so that every route and ``/readyz`` answer it at once; None when all still pass (the
        failure was not the store's)."""
        with self._lock:
            loaded = dict(self._handles)
        order = [name for name in names if name in loaded] + [name for name in loaded if name not in names]
        for name in order:
            try:
                Datastore.open(loaded[name].store.path).check_shards()
            except StoreError as err:
                return self._unavailable(name, str(err))
            except OSError as err:
                return self._unavailable(name, f"{err.filename or name}: {err.strerror or err}")
        return None

    def _forget(self, name: str, reason: str) -> None:
        with self._lock:
            self._handles.pop(name, None)
            self._errors[name] = reason


# ------------------------------------------------------------------------------- selections


@dataclass
class CachedSelection:
    """A finished selection and what is needed to page through or export it."""

    selection_id: str
    datastore: str
    selection: Selection
    engine: SelectionEngine
    exports: dict[str, Path] = field(default_factory=dict)  # format -> written file


class SelectionCache:
    """Thread-safe LRU of :class:`CachedSelection` by selection id."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[str, CachedSelection] = OrderedDict()

    def get(self, selection_id: str) -> CachedSelection | None:
        with self._lock:
            item = self._items.get(selection_id)
            if item is not None:
                self._items.move_to_end(selection_id)
            return item

    def put(self, item: CachedSelection) -> None:
        with self._lock:
            self._items[item.selection_id] = item
            self._items.move_to_end(item.selection_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
