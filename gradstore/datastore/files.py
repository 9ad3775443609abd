"""File operations every part of the datastore writes and reads through.

Writes are atomic: a file's content goes to a temporary name on the target's file system, is
fsynced, and is renamed over the target, then the folder is fsynced, so a crash leaves the old
file or the new one, never part of one. A write that fails (a full disk, a file size limit, a
read-only folder) removes its temporary file and raises :class:`StoreError` naming the target.
Matrices are NumPy ``.npy`` files (format 1.0, little-endian, row-major), read through memory
maps after their header is checked against the shape the manifest implies. A reader keeps its
read-only maps open (:class:`MapCache`): the pages of an open map stay in the process's page
tables once touched, so a second scan of the same files reads them at memory speed, where a fresh
map takes a page fault per page again (bench/RESULTS.md, "Selection scan"). The kernel bounds a
process's maps, so every reader of the process shares one budget (:class:`MapBudget`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError

_HASH_CHUNK = 8 << 20
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def os_reason(err: OSError) -> str:
    """The system's words for an OSError (``No space left on device``), else its message."""
    return os.strerror(err.errno) if err.errno else str(err)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _temp_path(final: Path, tmp_dir: Path | None) -> Path:
    """A temporary name unique to this process and target, on the target's file system."""
    folder = tmp_dir if tmp_dir is not None else final.parent
    folder.mkdir(parents=True, exist_ok=True)
    tag = "-".join(final.parts[-3:])
    return folder / f".{tag}.{os.getpid()}.tmp"


def move_into_place(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the directory."""
    _fsync_file(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def written_atomically(final: Path, tmp_dir: Path | None = None) -> Iterator[Path]:
    """A temporary path to write ``final``'s content to; moved into place when the block ends
    (see the module docstring for failures)."""
    tmp = None
    try:
        tmp = _temp_path(final, tmp_dir)
        yield tmp
        move_into_place(tmp, final)
    except OSError as err:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise StoreError(f"{final}: cannot write: {os_reason(err)}") from err


def atomic_write_bytes(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    with written_atomically(final, tmp_dir) as tmp:
        tmp.write_bytes(data)


def write_matrix(matrix: np.ndarray, final: Path, tmp_dir: Path | None = None) -> None:
    """``matrix`` as a little-endian, row-major ``.npy`` file (format 1.0), atomically."""
    dtype = matrix.dtype.newbyteorder("<") if matrix.dtype.byteorder == ">" else matrix.dtype
    with written_atomically(final, tmp_dir) as tmp, open(tmp, "wb") as file:
        np.lib.format.write_array(file, np.ascontiguousarray(matrix, dtype=dtype), version=(1, 0),
                                  allow_pickle=False)


def rename(source: Path, target: Path) -> None:
    """``os.rename`` with the target's folder fsynced, and an error saying what was moved where."""
    try:
        os.rename(source, target)
    except OSError as err:
        raise StoreError(f"cannot rename {source} to {target}: {os_reason(err)} (the work directory must be "
                         f"on the same file system as the store)") from err
    fsync_dir(target.parent)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_infos(root: Path, relatives: Sequence[str]) -> dict[str, dict]:
    """``{relative: {bytes, sha256}}``, hashing files in parallel (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda rel: sha256(root / rel), relatives))
    return {rel: {"bytes": (root / rel).stat().st_size, "sha256": digest}
            for rel, digest in zip(relatives, digests)}


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StoreError(f"{folder}: {what} needs about {needed:,} bytes free, only {free:,} are")


def matrix_offset(path: Path, shape: tuple[int, int], dtype: str) -> int:
    """Where a ``.npy`` file's matrix begins, once its header is checked to say row-major
    ``dtype`` of ``shape``."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
            found, fortran_order, found_dtype = _NPY_HEADER_READERS[version](file)
            offset = file.tell()
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read the matrix file ({err})") from None
    if found_dtype != np.dtype(dtype) or found != tuple(shape) or fortran_order:
        order = "column-major" if fortran_order else "row-major"
        raise StoreError(f"{path}: the file holds {order} {found_dtype.str} {found}, expected row-major "
                         f"{np.dtype(dtype).str} {tuple(shape)} (the shard's rows x the store's dimension)")
    return offset


def map_matrix(path: Path, shape: tuple[int, int], dtype: str, writable: bool = False,
               offset: int | None = None) -> np.ndarray:
    """A ``.npy`` matrix as a ``numpy.memmap``: read-only, or copy-on-write with ``writable``
    (writes stay in this process, the file never changes). ``offset`` is where the matrix begins,
    from an earlier :func:`matrix_offset` of the same file (parsing the header costs more than
    mapping the file); None checks the header now. A ``memmap`` keeps its file's name and offset,
    so a reader may also read the file directly instead of through the map (the selection scan
    does, ``gradstore.selection.scan``)."""
    if offset is None:
        offset = matrix_offset(path, shape, dtype)
    expected = offset + np.dtype(dtype).itemsize * shape[0] * shape[1]
    try:
        size = os.stat(path).st_size
        if size != expected:
            raise StoreError(f"{path}: the matrix file has {size} bytes, its header says {expected} "
                             f"(truncated or extended)")
        if shape[0] * shape[1] == 0:  # nothing to map: mmap refuses an empty range
            return np.empty(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="c" if writable else "r", offset=offset, shape=shape)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read the matrix file ({err})") from None


@functools.cache
def max_open_maps() -> int:
    """How many maps the process's :class:`MapCache` objects keep open together: a quarter of the
    kernel's limit on a process's memory mappings (``vm.max_map_count``, 65,530 by default), which
    every map, thread stack and shared library counts against; 4,096 where the limit cannot be
    read."""
    try:
        return max(64, int(Path("/proc/sys/vm/max_map_count").read_text()) // 4)
    except (OSError, ValueError):
        return 4096


class MapBudget:
    """The open maps of every :class:`MapCache` that shares this budget, least recently used
    first, at most ``capacity`` (default :func:`max_open_maps`) together: the kernel limits maps
    per process, not per store, so a process holds one budget (``PROCESS_MAPS``) however many
    stores it opens. Safe to share between threads."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity or max_open_maps()
        self._order: OrderedDict[tuple[int, Path], weakref.ref[MapCache]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._order)

    def use(self, cache: MapCache, path: Path) -> list[tuple[MapCache, Path]]:
        """Record that ``cache`` used its map of ``path``; the maps to close (the least recently
        used, any cache's) to keep within the budget."""
        key = (id(cache), path)
        closing = []
        with self._lock:
            if key in self._order:
                self._order.move_to_end(key)
            else:
                self._order[key] = cache.ref
            while len(self._order) > self.capacity:
                (_, victim), owner = self._order.popitem(last=False)
                holder = owner()
                if holder is not None:
                    closing.append((holder, victim))
        return closing

    def forget(self, cache_id: int) -> None:
        """Drop the entries of a cache that is gone (its maps went with it)."""
        with self._lock:
            for key in [key for key in self._order if key[0] == cache_id]:
                del self._order[key]


PROCESS_MAPS = MapBudget()


class MapCache:
    """Read-only maps of immutable files (a matrix, or anything holding maps, such as a quantised
    copy's codes and scales), kept open for reuse within a :class:`MapBudget` (default the
    process's, ``PROCESS_MAPS``) shared with the process's other caches: past it, the least
    recently used map of any of them is closed. Safe to share between threads.

    Only for files that never change while they are mapped (a published version's files): a file
    truncated under a live map kills the process that touches the lost pages (SIGBUS).
    """

    def __init__(self, budget: MapBudget | None = None):
        self.budget = budget if budget is not None else PROCESS_MAPS
        self.ref = weakref.ref(self)
        self._maps: dict[Path, Any] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, self.budget.forget, id(self))

    def __len__(self) -> int:
        return len(self._maps)

    def get(self, path: Path, open_map: Callable[[], Any]) -> Any:
        """The open map of ``path``, else ``open_map()`` kept as it. A map closed by the budget
        stays valid for whoever still holds it (it is unmapped when the last reference goes)."""
        with self._lock:
            found = self._maps.get(path)
        if found is None:
            opened = open_map()  # outside the lock: other threads' lookups need not wait for a header
            with self._lock:
                found = self._maps.setdefault(path, opened)
        for owner, victim in self.budget.use(self, path):
            owner._close(victim)
        return found

    def _close(self, path: Path) -> None:
        with self._lock:
            self._maps.pop(path, None)
