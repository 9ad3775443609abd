"""Atomic publication of a finished folder: a datastore, or any output written beside its target.

A producer writes everything into a private work folder on the target's file system, then
:func:`publish_folder` fsyncs every file in it and renames it to the target in one step, so a
reader finds the target absent, the old one or the new one complete, never a part. Replacing an
existing target (only when asked, and only a target the caller recognises as its own kind, or an
empty folder) renames the old one to a hidden sibling ``.NAME.replaced-*`` first and deletes it
after; such siblings left by a process killed in between are deleted by the next publication.
Between the two renames (a few microseconds) the target does not exist and an open fails.

New versions of an existing store are published differently, without moving the store
(:mod:`.versions`): their files go in under new names and ``manifest.json`` is replaced last.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .errors import StoreError
from .files import fsync_dir, rename
from .layout import MANIFEST_FILE
from .manifest import Manifest


def publish_folder(work: Path, out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """Move the finished folder ``work`` to ``out`` (see the module docstring); ``replaceable``
    says whether an existing ``out`` is a ``what`` this publication may replace."""
    work, out = Path(work), Path(out)
    if work.resolve() == out.resolve():
        raise StoreError(f"{out}: the work directory is already the output path")
    _fsync_tree(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(out):
        rename(work, out)
        _remove_replaced(out)
        return
    if not overwrite:
        raise StoreError(f"{out}: already exists; pass --overwrite to replace it")
    if not (out.is_dir() and not out.is_symlink() and (replaceable(out) or not any(out.iterdir()))):
        raise StoreError(f"{out}: exists and is not a {what}; refusing to replace it")
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{time.time_ns()}"
    rename(out, old)
    try:
        rename(work, out)
    except StoreError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
    _remove_replaced(out)


def publish_store(work_dir: str | Path, out: str | Path, overwrite: bool) -> None:
    """Publish a finalised work directory as the store ``out`` (a reader that opened an older
    store there must reopen it afterwards: its files are gone)."""
    Manifest.load(Path(work_dir) / MANIFEST_FILE)  # only finalised stores are published
    publish_folder(Path(work_dir), Path(out), overwrite, lambda path: (path / MANIFEST_FILE).exists(),
                   "gradstore datastore")


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root``, so the rename publishes durable content."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _remove_replaced(out: Path) -> None:
    """Delete the old targets an interrupted replacement left beside ``out`` (``.NAME.replaced-*``)."""
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.replaced-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
