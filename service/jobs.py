"""Indexing jobs run by the service: a persistent FIFO queue of ``gradstore index`` subprocesses.

:class:`JobStore` keeps the jobs in SQLite (``<root>/.gradstore/jobs.sqlite``, WAL mode), so the
queue, the history and the progress of every job survive a restart of the service.

:class:`JobManager` validates submissions (:meth:`JobManager.submit`), and one worker thread runs
the queued jobs one at a time, oldest first. Each job is a subprocess::

    python -m gradstore.cli index --corpus-list=<root>/.gradstore/jobs/<id>/corpus.txt --model=...
        --out=<root>/<name> --no-progress --progress-file=<root>/.gradstore/jobs/<id>/progress.json

(the corpus entries in a file, one per line, so that no number of them overflows a command
line), with stdout and stderr appended to ``<root>/.gradstore/jobs/<id>/index.log``. The
indexer gets the parent-death signal (Linux ``PR_SET_PDEATHSIG``): a service that dies, even by
SIGKILL, takes its indexer with it. The worker polls the process and its progress file (reset
for each attempt), and records the outcome: ``succeeded``, ``failed``, or ``cancelled``
(:meth:`JobManager.cancel`: SIGTERM, then SIGKILL after a grace period). A failed or cancelled
job's partial work is discarded. A failed job's ``error`` is the indexer's one-line explanation
(``error: ...``), the service root left out of paths; an indexer that died with a traceback gets
a message naming the exception type, and the traceback goes to the service log.

Every job is resumable, because the indexer is: a job interrupted at any point and run again with
the same command keeps its finished shards. So:

* :meth:`JobManager.stop` (an orderly shutdown) terminates the running job and puts it back in
  the queue; that interruption does not count as an attempt.
* :meth:`JobManager.start` finds jobs that a previous service process left ``running`` (it
  crashed or was killed): an indexer it left behind is terminated, and the job is queued again to
  resume, unless it was already started :data:`MAX_ATTEMPTS` times, in which case it fails with
  an explanation. A job that had already published its store is marked succeeded.

A job is never left ``running`` without a live indexer for long: the next service start settles it.

Several service processes may share a root (for instance ``uvicorn --workers N``): they share the
queue, and an exclusive lock (``<root>/.gradstore/jobs.lock``) makes exactly one of them run jobs;
the others take over when it exits. Cancellation works from any of them (through the database).

Submissions are validated in full before anything runs (:meth:`JobManager.submit`; the request
model already checks names, the device and the sizes): job input paths (corpus, model,
tokenizer, checkpoints, warmup run) must exist and resolve, symlinks followed, inside one of
``settings.job_input_roots`` (relative paths are taken relative to the service root); the output
``<root>/<name>`` and its work folder (``gradstore.datastore.work_dir_of``) must not be symbolic links or
files, so a job writes nowhere but in its own folder under the root. Files that a job reads are
never unpickled in full (``--trust-pickled-checkpoints`` is refused in ``index_args``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradstore.client.models import IndexJobRequest, Job, JobProgress
from gradstore.datastore import Manifest, StoreError, work_dir_of
from gradstore.indexer.checkpoints import TRUST_FLAG

from .errors import ServiceError
from .registry import check_name

try:  # POSIX; elsewhere every process runs jobs (do not run several on one root there)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("gradstore.service.jobs")

STATE_DIR = ".gradstore"
DB_FILE = "jobs.sqlite"
LOCK_FILE = "jobs.lock"
JOBS_DIR = "jobs"
PROGRESS_FILE = "progress.json"
LOG_FILE = "index.log"
CORPUS_LIST_FILE = "corpus.txt"
JOB_CURSOR_PATTERN = r"^[1-9][0-9]{0,17}$"  # the row id the next page starts before
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The request's settings an append takes from the store when it leaves them out, and where the
# store's recorded indexing config (the manifest's ``settings.config``) holds each.
RECORDED_SETTINGS = {
    "gradient_type": ("gradient_type",), "proj_dim": ("projection", "dim"), "seed": ("projection", "seed"),
    "max_length": ("max_length",), "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"),
    "on_bad_record": ("on_bad_record",), "dtype": ("dtype",),
}

MAX_ATTEMPTS = 3
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
ERROR_LINES = 12
ERROR_CHARS = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    datastore        TEXT NOT NULL,
    status           TEXT NOT NULL,
    request          TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    progress         TEXT NOT NULL DEFAULT '{}',
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    pid              INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_by_datastore ON jobs (datastore, status);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------


class JobStore:
    """The jobs table in SQLite: one connection shared by the service's threads under a lock.

    Rows are dicts with the table's columns (``request`` and ``progress`` as JSON text). Status
    changes that race with another thread or process (claiming a queued job, cancelling it) are
    single conditional ``UPDATE``s, so exactly one side wins.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction: check-then-insert without races."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def insert(self, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", tuple(row.values()))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def all(self) -> list[dict[str, Any]]:
        """Every job, newest first."""
        return self.page(None, -1)[0]

    def page(self, before: int | None, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """Up to ``limit`` jobs (all for -1) older than row ``before``, newest first, and the row
        id to continue before (None at the end)."""
        query, params = "SELECT rowid AS _row, * FROM jobs", []
        if before is not None:
            query, params = query + " WHERE rowid < ?", [before]
        with self._lock:
            rows = [dict(row) for row in self._conn.execute(query + " ORDER BY rowid DESC LIMIT ?",
                                                            [*params, limit if limit < 0 else limit + 1])]
        more = 0 <= limit < len(rows)
        rows = rows[:limit] if more else rows
        last = rows[-1]["_row"] if more else None
        for row in rows:
            del row["_row"]
        return rows, last

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        """Jobs in these states, oldest first."""
        marks = ", ".join("?" for _ in statuses)
        with self._lock:
            rows = self._conn.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                                      statuses).fetchall()
        return [dict(row) for row in rows]

    def active_for(self, datastore: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM jobs WHERE datastore = ? AND status IN ('queued', 'running') ORDER BY rowid LIMIT 1",
                (datastore,)).fetchone()
        return dict(row) if row is not None else None

    def update(self, job_id: str, *, expect: str | Sequence[str] | None = None, **fields: Any) -> bool:
        """Set ``fields`` of a job (only while its status is ``expect``); True when a row changed."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        query, params = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id]
        if expect is not None:
            states = (expect,) if isinstance(expect, str) else tuple(expect)
            query += f" AND status IN ({', '.join('?' for _ in states)})"
            params += states
        with self._lock:
            return self._conn.execute(query, params).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ------------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------------


class JobManager:
    """Accepts, persists and runs indexing jobs for one service root (see the module docstring).

    ``index_args`` are extra ``gradstore index`` flags the operator adds to every job (for
    instance ``["--max-tokens-per-batch", "65536"]`` for the host's GPU, or ``--shard-size``).
    """

    def __init__(self, settings, *, index_args: Sequence[str] = (), max_attempts: int = MAX_ATTEMPTS,
                 poll_interval: float = 0.25, kill_grace: float = 10.0):
        self.settings = settings
        self.root = Path(settings.root).resolve()
        self.input_roots = [Path(p).resolve() for p in (settings.job_input_roots or [self.root])]
        self.index_args = [str(arg) for arg in index_args]
        if any(arg.partition("=")[0] == TRUST_FLAG for arg in self.index_args):
            # A job's files come from clients: the service never unpickles them in full.
            raise ValueError(f"{TRUST_FLAG} is not allowed in the service's index arguments")
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self.state_dir = self.root / STATE_DIR
        self.jobs_dir = self.state_dir / JOBS_DIR
        self.store = JobStore(self.state_dir / DB_FILE)
        self._stopping = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # -- public API ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive (what ``/readyz`` reports)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Settle jobs a previous service process left running, then start the worker thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        if not self._try_lead():
            log.info("another service process runs the jobs of %s; this one queues and reports them", self.root)
        self._thread = threading.Thread(target=self._work, name="gradstore-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; a running job is terminated and queued again, to resume on the next start."""
        self._stopping.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout=self.kill_grace + 30)
            if self._thread.is_alive():
                log.warning("the job worker did not stop in time")
            self._thread = None
        self._release_lead()

    def submit(self, request: IndexJobRequest) -> Job:
        """Validate and queue a job; 400 ``invalid_name`` / ``invalid_job``, 403 ``path_not_allowed``
        (an input outside the allowed folders), 404 ``input_not_found`` (or ``datastore_not_found``
        for an append), 409 ``conflict`` when the datastore exists (without ``overwrite`` or
        ``append``), has an active job, or its path is a link, or when an append gives a setting
        the store was indexed without."""
        if request.append:
            request = self._with_store_settings(request)
        self.index_command(request, self.jobs_dir / "new")  # validates every input, writes nothing
        out = self.root / request.datastore
        job_id = uuid.uuid4().hex
        with self.store.transaction() as conn:
            active = conn.execute("SELECT id, status FROM jobs WHERE datastore = ? AND status IN ('queued', 'running')",
                                  (request.datastore,)).fetchone()
            if active is not None:
                raise ServiceError(409, "conflict", f"datastore {request.datastore!r} already has a {active['status']} "
                                   f"job ({active['id']})", {"datastore": request.datastore, "job": active["id"]})
            if out.exists() and not (request.overwrite or request.append):
                raise ServiceError(409, "conflict", f"datastore {request.datastore!r} already exists; set "
                                   "overwrite to replace it, or append to add to it", {"datastore": request.datastore})
            conn.execute("INSERT INTO jobs (id, datastore, status, request, created_at) VALUES (?, ?, 'queued', ?, ?)",
                         (job_id, request.datastore, request.model_dump_json(), _now()))
        log.info("job %s queued: index %s", job_id, request.datastore)
        self._poke.set()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self.store.get(job_id) if isinstance(job_id, str) else None
        if row is None:
            raise ServiceError(404, "job_not_found", f"no job {job_id!r}", {"job": job_id})
        return _to_job(row)

    def list(self) -> list[Job]:
        """Every job, newest first."""
        return [_to_job(row) for row in self.store.all()]

    def page(self, limit: int, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """``limit`` jobs, newest first, after ``cursor`` (from the previous page), and the next
        page's cursor (None on the last); 400 ``invalid_cursor`` for a cursor this did not issue."""
        before = None
        if cursor is not None:
            if not re.fullmatch(JOB_CURSOR_PATTERN, cursor):
                raise ServiceError(400, "invalid_cursor", "the cursor is not one this service issued",
                                   {"field": "cursor"})
            before = int(cursor)
        rows, last = self.store.page(before, limit)
        return [_to_job(row) for row in rows], (str(last) if last is not None else None)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (waiting up to the kill grace period for a running one to
        stop); 409 ``conflict`` for a finished job."""
        job = self.get(job_id)
        if self.store.update(job_id, expect="queued", status="cancelled", finished_at=_now()):
            log.info("job %s cancelled while queued", job_id)
            return self.get(job_id)
        if self.store.update(job_id, expect="running", cancel_requested=1):
            self._poke.set()
            deadline = time.monotonic() + self.kill_grace + 10
            while time.monotonic() < deadline:
                job = self.get(job_id)
                if job.status != "running":
                    return job
                time.sleep(0.05)
            return self.get(job_id)
        job = self.get(job_id)
        if job.status == "queued":  # it was requeued while we looked: try again
            return self.cancel(job_id)
        raise ServiceError(409, "conflict", f"job {job_id} is already {job.status}",
                           {"job": job_id, "status": job.status})

    # -- validation and the command line ---------------------------------------------------------

    def _with_store_settings(self, request: IndexJobRequest) -> IndexJobRequest:
        """An append's request with each setting it leaves out taken from the store's recorded
        config, so that the job's record names the settings it runs with; 404
        ``datastore_not_found``, 409 ``conflict`` for a store that records no settings or a given
        setting it differs in (the indexer also compares the model's and checkpoints' hashes)."""
        name = request.datastore
        check_name(name)
        if not (self.root / name).is_dir() or (self.root / name).is_symlink():
            raise ServiceError(404, "datastore_not_found", f"no datastore named {name!r} to append to",
                               {"datastore": name})
        try:
            recorded = Manifest.load(self.root / name).settings.get("config")
        except StoreError as err:
            raise ServiceError(409, "conflict", f"datastore {name!r} cannot be appended to: "
                               f"{self._relative(str(err))}", {"datastore": name}) from None
        if recorded is None:
            raise ServiceError(409, "conflict", f"datastore {name!r} records no indexing settings (it was "
                               "migrated from schema version 1): append with `gradstore index --append`, giving "
                               "every setting it was indexed with", {"datastore": name})
        try:
            stored = {field: _setting(recorded, path) for field, path in RECORDED_SETTINGS.items()}
        except (KeyError, TypeError):
            raise ServiceError(409, "conflict", f"datastore {name!r} records incomplete indexing settings (its "
                               "manifest's settings.config): append with `gradstore index --append`, giving "
                               "every setting it was indexed with", {"datastore": name}) from None
        given = request.model_fields_set
        differences = [f"{field}: store {stored[field]!r}, request {getattr(request, field)!r}"
                       for field in RECORDED_SETTINGS if field in given and getattr(request, field) != stored[field]]
        if differences:
            raise ServiceError(409, "conflict", f"datastore {name!r} was indexed with other settings: "
                               + "; ".join(differences) + ". Leave them out to take the store's",
                               {"datastore": name, "differences": differences})
        return request.model_copy(update={field: value for field, value in stored.items() if field not in given})

    def index_command(self, request: IndexJobRequest, job_dir: Path) -> tuple[list[str], list[str]]:
        """The ``gradstore index`` command of a job whose files are in ``job_dir``, and the lines
        of its corpus list (``job_dir/corpus.txt``, for the caller to write); raises
        :class:`ServiceError` for bad inputs."""
        name = request.datastore
        check_name(name)
        self._check_output(name)
        self._check_rules(request)
        corpus = [self._corpus_arg(spec) for spec in request.corpus]
        command = [sys.executable, "-m", "gradstore.cli", "index", f"--corpus-list={job_dir / CORPUS_LIST_FILE}"]
        if request.model:  # else an append: the store's
            command.append(f"--model={self._input_path('model', request.model)}")
        if request.tokenizer:
            command.append(f"--tokenizer={self._input_path('tokenizer', request.tokenizer)}")
        for spec in request.checkpoints:
            command.append(f"--checkpoint={self._checkpoint_arg(spec)}")
        if request.run:
            command.append(f"--run={self._input_path('run', request.run)}")
        command += [f"--gradient-type={request.gradient_type}", f"--proj-dim={request.proj_dim}",
                    f"--seed={request.seed}", f"--max-length={request.max_length}", f"--lora-r={request.lora_r}",
                    f"--lora-alpha={request.lora_alpha!r}", f"--on-bad-record={request.on_bad_record}",
                    f"--device={request.device}", f"--dtype={request.dtype}"]
        command += [flag for flag, on in (("--overwrite", request.overwrite), ("--append", request.append),
                                          ("--replace", request.replace)) if on]
        # A partial job of the same datastore left with other settings (a failed or cancelled job)
        # is discarded; one with the same settings (this job, interrupted) is resumed.
        command.append("--restart")
        command += self.index_args
        command += [f"--out={self.root / name}", "--no-progress", f"--progress-file={job_dir / PROGRESS_FILE}"]
        return command, corpus

    @staticmethod
    def _check_rules(request: IndexJobRequest) -> None:
        """400 ``invalid_job`` for a request the model's JSON-schema rules (``_JOB_RULES``) refuse."""
        if request.run and request.checkpoints:
            raise ServiceError(400, "invalid_job", "give run or checkpoints, not both")
        if request.append:
            if request.overwrite:
                raise ServiceError(400, "invalid_job", "give append (add to the datastore) or overwrite (replace "
                                   "it), not both")
            return  # the store's model and checkpoints serve where none are given
        if request.replace:
            raise ServiceError(400, "invalid_job", "replace goes with append")
        if request.model is None:
            raise ServiceError(400, "invalid_job", "give the model (only an append takes the store's)",
                               {"field": "model"})
        if request.gradient_type in ("adam", "less") and not (request.run or request.checkpoints):
            raise ServiceError(400, "invalid_job", f"gradient type {request.gradient_type!r} needs checkpoints "
                               "with optimizer state (checkpoints or run); use 'sgd' or 'sign' for a fresh LoRA")

    def _check_output(self, name: str) -> None:
        """409 ``conflict`` when the store's path or its work folder is a symbolic link or not a
        folder: the job would write through it (or fail only when it publishes)."""
        for path in (self.root / name, work_dir_of(self.root / name)):
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                kind = "a symbolic link" if path.is_symlink() else "not a folder"
                raise ServiceError(409, "conflict", f"{path.name!r} in the service root is {kind}; a job writes only "
                                   "to a folder of its own: remove it or choose another datastore name",
                                   {"datastore": name, "path": path.name})

    def _input_path(self, field: str, text: str) -> Path:
        """``text`` resolved (relative to the root), inside an input root, existing."""
        return Path(self._existing_input(field, text))

    # The corpus may list 100,000 entries and more: these use os.path on strings (pathlib's
    # objects cost several times as much per path).
    def _existing_input(self, field: str, text: str) -> str:
        if "\n" in text or "\r" in text:  # no such path is allowed: the corpus list has one per line
            raise ServiceError(400, "invalid_job", f"{field} {text!r} contains a line break", {"field": field,
                                                                                               "path": text})
        path = self._allowed(field, text)
        if not os.path.exists(path):
            raise ServiceError(404, "input_not_found", f"{field} {text!r} does not exist", {"field": field, "path": text})
        return path

    def _allowed(self, field: str, text: str) -> str:
        resolved = os.path.realpath(os.path.join(self.root, text))  # an absolute text replaces the root
        if not any(resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep)
                   for root in map(str, self.input_roots)):
            raise ServiceError(403, "path_not_allowed", f"{field} path {text!r} is outside the folders allowed "
                               "for job inputs", {"field": field, "path": text})
        return resolved

    def _corpus_arg(self, spec: str) -> str:
        """``[NAME=]PATH`` with PATH resolved; the source keeps the name the given path implies."""
        name, text = "", spec
        if "=" in spec and not os.path.exists(os.path.join(self.root, spec)):
            name, text = spec.split("=", 1)
            if not name:
                raise ServiceError(400, "invalid_job", f"corpus {spec!r}: empty name before '='",
                                   {"field": "corpus", "path": spec})
        path = self._existing_input("corpus", text)
        if not name:
            given = os.path.basename(text.rstrip(os.sep)) if os.path.isdir(path) else Path(text).stem
            name = given
        return f"{name}={path}" if name and "=" not in name else path

    def _checkpoint_arg(self, spec: str) -> str:
        from gradstore.indexer.checkpoints import CheckpointSpec
        from gradstore.indexer.errors import CheckpointError

        try:
            parsed = CheckpointSpec.parse(spec)
        except CheckpointError as exc:
            raise ServiceError(400, "invalid_job", str(exc), {"field": "checkpoints", "path": spec}) from exc
        path = self._input_path("checkpoint", str(parsed.path))
        if "=" in parsed.name:
            raise ServiceError(400, "invalid_job", f"checkpoint {spec!r}: name it with NAME=DIR",
                               {"field": "checkpoints", "path": spec})
        return f"{parsed.name}={path}" + (f":{parsed.weight!r}" if parsed.weight is not None else "")

    # -- leadership and recovery ---------------------------------------------------------------

    def _try_lead(self) -> bool:
        """Take the root's job lock (non-blocking); on success, settle jobs left running."""
        if self._lock_fd is not None:
            return True
        if fcntl is not None:
            fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._lock_fd = fd
        else:  # pragma: no cover
            self._lock_fd = -1
        self._recover()
        return True

    def _release_lead(self) -> None:
        if self._lock_fd is not None and self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    def _recover(self) -> None:
        """Jobs marked running now have no supervisor (their service process is gone): settle them."""
        for row in self.store.with_status("running"):
            job_id = row["id"]
            # The pid is recorded just after the indexer starts; a service killed in between left
            # none, so the job's indexer is also looked up by its (job-unique) progress file.
            pids = [row["pid"]] if row["pid"] else _indexers_of(self._progress_file(job_id))
            for pid in pids:
                if _is_indexer_of(pid, self._progress_file(job_id)):
                    log.warning("job %s: terminating indexer %d left behind by a previous service process", job_id, pid)
                    _terminate_orphan(pid, self.kill_grace)
                elif _exiting(pid):
                    # Killed with its service (PR_SET_PDEATHSIG) and still tearing down, which can take
                    # a while on a loaded host: wait, so that no indexer of the job outlives recovery.
                    _wait_gone(pid, self.kill_grace)
            report = _read_json(self._progress_file(job_id))
            common = {"pid": None, "cancel_requested": 0}
            if report.get("phase") == "done":
                self.store.update(job_id, expect="running", status="succeeded", finished_at=_now(),
                                  progress=json.dumps(report), **common)
                log.info("job %s had finished before the service restarted", job_id)
            elif row["cancel_requested"]:
                self._discard_partial(row)
                self.store.update(job_id, expect="running", status="cancelled", finished_at=_now(), **common)
            elif row["attempts"] >= self.max_attempts:
                self._discard_partial(row)
                self.store.update(job_id, expect="running", status="failed", finished_at=_now(), **common,
                                  error=f"the service stopped while this job ran, {row['attempts']} times; "
                                        f"giving up after {self.max_attempts} attempts")
                log.error("job %s failed: interrupted %d times (log: %s)", job_id, row["attempts"],
                          self._log_file(job_id))
            else:
                self.store.update(job_id, expect="running", status="queued", **common)
                log.warning("job %s was interrupted by a service restart; queued again to resume", job_id)

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._try_lead():
                    self._stopping.wait(2.0)
                    continue
                row = self._claim_next()
                if row is None:
                    self._poke.wait(1.0)
                    self._poke.clear()
                    continue
                self._run(row)
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                log.exception("job worker error")
                self._stopping.wait(1.0)

    def _claim_next(self) -> dict[str, Any] | None:
        for row in self.store.with_status("queued"):
            # Progress starts over with each attempt (a resumed one reports its own, finished shards included).
            if self.store.update(row["id"], expect="queued", status="running", pid=None, cancel_requested=0,
                                 attempts=row["attempts"] + 1, started_at=row["started_at"] or _now(), progress="{}"):
                return self.store.get(row["id"])
        return None

    def _run(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        try:
            self._run_claimed(row)
        except Exception as exc:  # never leave a job marked running
            log.exception("job %s: supervision failed", job_id)
            self._discard_partial(row)
            self.store.update(job_id, expect="running", status="failed", finished_at=_now(), pid=None,
                              error=f"internal error while running the job ({type(exc).__name__}); "
                                    "the details are in the service log")

    def _run_claimed(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        request = IndexJobRequest.model_validate_json(row["request"])
        progress_file, log_file = self._progress_file(job_id), self._log_file(job_id)
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        progress_file.unlink(missing_ok=True)
        try:
            command, corpus = self.index_command(request, progress_file.parent)
        except ServiceError as exc:  # an input changed or vanished since submission
            self._discard_partial(row)
            self._finish(job_id, "failed", error=exc.message)
            return
        (progress_file.parent / CORPUS_LIST_FILE).write_text("".join(f"{entry}\n" for entry in corpus))
        with open(log_file, "ab") as sink:
            sink.write(f"--- attempt {row['attempts']} at {_now()}: {' '.join(command)}\n".encode())
            sink.flush()
            offset = sink.tell()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                       cwd=self.root, env=env, start_new_session=True,
                                       preexec_fn=_die_with(os.getpid()) if sys.platform == "linux" else None)
        self.store.update(job_id, pid=process.pid)
        log.info("job %s: attempt %d started (pid %d)", job_id, row["attempts"], process.pid)
        reason = self._supervise(job_id, process, progress_file)
        report = _read_json(progress_file)
        if report:
            self.store.update(job_id, progress=json.dumps(report))
        if process.returncode == 0 or report.get("phase") == "done":
            self._finish(job_id, "succeeded")
        elif reason == "cancel" or (self.store.get(job_id) or {}).get("cancel_requested"):
            self._discard_partial(row)
            self._finish(job_id, "cancelled")
        elif reason == "stop":
            # An orderly shutdown: resume on the next start, and do not count this attempt.
            self.store.update(job_id, expect="running", status="queued", pid=None, attempts=row["attempts"] - 1)
            log.info("job %s: interrupted by the service stopping; queued to resume", job_id)
        else:
            error, traceback = _failure_message(log_file, offset, process.returncode)
            if traceback:
                log.error("job %s: the indexer failed:\n%s", job_id, traceback)
            self._discard_partial(row)
            self._finish(job_id, "failed", error=self._relative(error))

    def _supervise(self, job_id: str, process: subprocess.Popen, progress_file: Path) -> str | None:
        """Wait for the process, copying its progress; terminate it on cancel or stop."""
        last = None
        while True:
            exited = process.poll() is not None
            text = _read_text(progress_file)
            if text is not None and text != last:
                last = text
                try:
                    self.store.update(job_id, progress=json.dumps(json.loads(text)))
                except json.JSONDecodeError:
                    pass
            if exited:
                return None
            current = self.store.get(job_id)
            reason = "cancel" if current is None or current["cancel_requested"] else None
            if reason is None and self._stopping.is_set():
                reason = "stop"
            if reason is not None:
                log.info("job %s: terminating the indexer (%s)", job_id, reason)
                _terminate(process, self.kill_grace)
                return reason
            self._poke.wait(self.poll_interval)
            self._poke.clear()

    def _finish(self, job_id: str, status: str, error: str | None = None) -> None:
        self.store.update(job_id, expect="running", status=status, finished_at=_now(), pid=None, error=error)
        log.info("job %s %s%s", job_id, status, f": {error.splitlines()[-1]}" if error else "")

    def _discard_partial(self, row: dict[str, Any]) -> None:
        """Remove a failed or cancelled job's partial output (its work directory beside the
        store; a link there is removed, never followed)."""
        partial = work_dir_of(self.root / row["datastore"])
        if partial.is_symlink() or partial.is_file():
            partial.unlink(missing_ok=True)
        elif partial.exists():
            shutil.rmtree(partial, ignore_errors=True)

    def _relative(self, message: str) -> str:
        """``message`` with paths under the service root written relative to it."""
        return message.replace(f"{self.root}/", "")

    def _progress_file(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / PROGRESS_FILE

    def _log_file(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / LOG_FILE


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _to_job(row: dict[str, Any]) -> Job:
    progress = JobProgress.model_validate(json.loads(row["progress"] or "{}"))
    return Job(id=row["id"], status=row["status"], request=IndexJobRequest.model_validate_json(row["request"]),
               created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
               progress=progress, error=row["error"], attempts=row["attempts"])


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _failure_message(log_file: Path, offset: int, returncode: int | None) -> tuple[str, str | None]:
    """What a failed attempt's ``error`` says, from what it wrote to the log: the CLI's last
    ``error: ...`` line, else how the process ended; and the traceback it printed, if any (for
    the service log: it names the installation's files, so clients do not see it)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if errors and (not tracebacks or errors[-1] > tracebacks[-1]):
        explained = lines[errors[-1]:]  # the CLI's explanation (it may continue on a few lines)
        return "\n".join(explained[:ERROR_LINES])[:ERROR_CHARS], None
    if returncode is not None and returncode < 0:
        ended = f"the indexer was killed by signal {-returncode}"
    else:
        ended = f"the indexer exited with status {returncode}"
    if tracebacks:
        trace = "\n".join(lines[tracebacks[-1]:])
        kind = lines[-1].split(":", 1)[0].strip() if ":" in lines[-1] else lines[-1].strip()
        kind = kind if re.fullmatch(r"[A-Za-z_][\w.]*", kind) else "an exception"
        return f"{ended}: an unexpected {kind}; the details are in the service log", trace
    return ended, None


def _setting(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


def _die_with(parent: int):
    """A ``preexec_fn`` giving the child SIGKILL when the thread that started it exits (the job
    worker, or the whole service, however it dies); a child whose parent is already gone exits."""
    def set_parent_death_signal() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_parent_death_signal


def _terminate(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap the process."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_indexer_of(pid: int, progress_file: Path) -> bool:
    """Whether ``pid`` is still the indexer of the job with this progress file (not a reused pid)."""
    if not _pid_alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # cannot tell (no /proc): leave it alone
    return b"gradstore.cli" in args and f"--progress-file={progress_file}".encode() in args


def _exiting(pid: int) -> bool:
    """Whether ``pid`` is being torn down: alive, not yet a zombie, its memory already released (so
    its cmdline reads empty and it can no longer be told apart from any other process)."""
    try:
        return _pid_alive(pid) and not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    """Poll until ``pid`` is dead (or a zombie); whether it was within ``seconds``."""
    deadline = time.monotonic() + seconds
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _indexers_of(progress_file: Path) -> list[int]:
    """Pids of live indexers writing ``progress_file`` (found through /proc; empty without it)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        if _is_indexer_of(int(entry.name), progress_file):
            pids.append(int(entry.name))
    return pids


def _terminate_orphan(pid: int, grace: float) -> None:
    """Stop an indexer that is not our child: SIGTERM its group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                return
        if _wait_gone(pid, wait):
            return
