"""An indexing job: corpus -> per-example projected gradients -> a published datastore.

The job runs in four phases:

1. **Prepare** (every rank, deterministic): read the corpus, tokenise every record with its loss
   mask, assign rows in corpus order, cut rows into shards of ``shard_size``. Bad records stop the
   job here, before any compute, or are skipped and reported with ``on_bad_record="skip"``.
2. **Compute**: rank ``r`` of ``W`` takes shards ``r, r+W, …`` (on the GPU of its ``LOCAL_RANK``
   with ``--device cuda``). :class:`~gradstore.indexer.featurize.ExampleFeaturizer` computes a
   shard's outputs: examples sorted by length and packed into batches under a token budget and an
   example count (the device's defaults unless given: :mod:`gradstore.indexer.batching`); for
   each batch and checkpoint the per-example LoRA gradients are transformed
   (sgd/sign/adam/less), projected, normalised and kept, with the extras of
   :mod:`gradstore.indexer.extras` (representation vectors, gradient spectra, VoG) from the same
   pass. A shard's output for all checkpoints is written atomically and then marked done.
3. **Finalise** (rank 0, after every shard is done): FAISS index, checksums, manifest.
4. **Publish**: the work directory is renamed into place, so a reader never sees half a store.

The work directory ``.<name>.partial`` sits beside the output, with a ``job.json`` fingerprint
of the settings and inputs. Running the same job again resumes it: finished shards are kept and
the rest recomputed, so a killed job ends with the same store as an uninterrupted one. A job with
different settings refuses to reuse the directory unless told to restart. An output folder the
job cannot write to is refused before any compute; a write that fails later (a full disk) stops
the job with an error naming the file, leaving the finished shards for a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .batching import default_batching
from .checkpoints import CheckpointSpec, file_sha256, recorded_learning_rate
from .corpus import Corpus, CorpusSource, SkippedRecord, read_corpus, write_skipped_report
from .datastore import (MANIFEST_FILE, PENDING_MANIFEST, SHARDS_DIR, FeatureBatch, completed_shards,
                        finalize_store, os_reason, publish_store, write_shard)
from .errors import BadRecordError, JobError, StoreError
from .extras import ExtraFeatures
from .featurize import Computed, ExampleFeaturizer, FeaturizerSettings
from .formatting import Encoded, Formatter
from .model import LoraSpec, lora_description, resolve_device
from .optimizer_state import find_optimizer_file
from .projection import ProjectionSpec
from .transforms import GRADIENT_TYPES

JOB_FILE = "job.json"
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.model")


@dataclass
class IndexJobConfig:
    """Everything an indexing job needs; the CLI builds one from its flags."""

    corpus: list[CorpusSource]
    model: Path
    out: Path
    tokenizer: Path | None = None
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_type: str = "adam"
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    max_length: int = 2048
    template: str = "auto"
    max_tokens_per_batch: int | None = None  # None: the device's default (batching.default_batching)
    max_batch_size: int | None = None  # None: the device's default
    shard_size: int = 1024
    dtype: str = "fp32"
    device: str = "auto"
    index: str = "auto"
    index_memory_budget: int = 4 << 30
    raw_features: bool = True  # also write raw fp16 feature matrices (fast selection scans, twice the feature bytes)
    extras: ExtraFeatures = field(default_factory=ExtraFeatures)  # representations, gradient spectra, VoG
    on_bad_record: str = "error"
    overwrite: bool = False
    restart: bool = False
    progress: bool = True
    progress_file: Path | None = None  # rank 0 keeps a JSON progress report here (see _Progress)

    def validate(self) -> None:
        if self.gradient_type not in GRADIENT_TYPES:
            raise JobError(f"unknown gradient type {self.gradient_type!r}: expected one of {GRADIENT_TYPES}")
        if self.gradient_type in ("adam", "less") and not any(c.path for c in self.checkpoints):
            raise JobError(f"gradient type {self.gradient_type!r} needs checkpoints with optimizer state "
                           "(--checkpoint DIR); use 'sgd' or 'sign' for a fresh LoRA")
        names = [c.name for c in self.checkpoints]
        if len(set(names)) != len(names):
            raise JobError(f"checkpoint names must be unique, got {names}; name them with NAME=DIR")
        for positive in ("max_length", "max_tokens_per_batch", "max_batch_size", "shard_size"):
            if getattr(self, positive) is not None and getattr(self, positive) < 1:
                raise JobError(f"{positive} must be positive, got {getattr(self, positive)}")
        if self.out.exists() and not self.overwrite:
            raise JobError(f"{self.out} already exists; pass --overwrite to replace it")

    def with_device_batching(self, device_type: str) -> "IndexJobConfig":
        """This config with each batch limit left as ``None`` set to ``device_type``'s default
        (:func:`~gradstore.indexer.batching.default_batching`). The job batches with the result and
        records it in the manifest and in its resume fingerprint (beside the device type), so a
        resumed job batches exactly as the interrupted one did."""
        tokens, examples = default_batching(device_type)
        given_tokens, given_examples = self.max_tokens_per_batch, self.max_batch_size
        return replace(self, max_tokens_per_batch=tokens if given_tokens is None else given_tokens,
                       max_batch_size=examples if given_examples is None else given_examples)

    @property
    def work_dir(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"

    def effective_checkpoints(self) -> list[CheckpointSpec]:
        """The checkpoints to featurise: the given ones, or one fresh LoRA."""
        return self.featurizer_settings().effective_checkpoints()

    def featurizer_settings(self, device: torch.device | str | None = None) -> FeaturizerSettings:
        """The settings of the job's compute core (:class:`ExampleFeaturizer`)."""
        return FeaturizerSettings(
            model=self.model, tokenizer=self.tokenizer, checkpoints=self.checkpoints, lora=self.lora,
            gradient_type=self.gradient_type, projection=self.projection, max_length=self.max_length,
            template=self.template, max_tokens_per_batch=self.max_tokens_per_batch,
            max_batch_size=self.max_batch_size, dtype=self.dtype,
            device=self.device if device is None else device, extras=self.extras)

    def check_writable(self, with_work_dir: bool = True) -> None:
        """Fail before any compute when the job could not write its work directory or publish
        the store: the output's parent folder (and, ``with_work_dir``, a work directory left by an
        earlier run) must take new files."""
        earlier_work = [d for d in (self.work_dir, self.work_dir / SHARDS_DIR) if with_work_dir and d.is_dir()]
        folders = [self.out.parent] + earlier_work
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                handle, probe = tempfile.mkstemp(dir=folder, prefix=".gradstore-write-check-")
                os.close(handle)
                os.unlink(probe)
            except OSError as err:
                raise JobError(f"{folder}: cannot write here ({os_reason(err)}); the indexing job writes "
                               f"{self.work_dir.name} and then {self.out.name} into this folder") from None


@dataclass
class JobSummary:
    """What a finished job reports (also stored in the manifest's ``job`` section)."""

    examples: int
    tokens: int
    skipped: int
    truncated: int
    checkpoints: int
    wall_seconds: float
    examples_per_second: float
    tokens_per_second: float
    store_bytes: int
    oom_retries: int
    world_size: int
    shards_computed: int
    shards_reused: int

    def lines(self) -> list[str]:
        return [
            f"examples      {self.examples:,} ({self.skipped:,} skipped, {self.truncated:,} truncated)",
            f"tokens        {self.tokens:,}",
            f"checkpoints   {self.checkpoints}",
            f"wall time     {self.wall_seconds:,.1f} s ({self.shards_computed} shards computed, "
            f"{self.shards_reused} reused)",
            f"throughput    {self.examples_per_second:,.1f} examples/s, {self.tokens_per_second:,.0f} tokens/s "
            "(per checkpoint pass)",
            f"store size    {self.store_bytes / 2**20:,.1f} MiB",
        ]


@dataclass
class Prepared:
    """The tokenised corpus, in row order."""

    corpus: Corpus
    encoded: list[Encoded]
    skipped: list[SkippedRecord]

    @property
    def num_rows(self) -> int:
        return len(self.encoded)


# ------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE)
# ------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _init_distributed(world_size: int) -> None:
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


def rank_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun, ``cuda`` without an index means the rank's own GPU
    of its node (``LOCAL_RANK``), so N ranks on a node use N GPUs rather than all sharing GPU 0.
    A named device (``cuda:0``) is used as given; plain ``cuda`` outside torchrun is the current GPU,
    named by its index (``torch.cuda.set_device`` needs one)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or device.index is not None:
        return device
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    visible = torch.cuda.device_count()
    if int(local_rank) >= visible:
        raise JobError(f"LOCAL_RANK {local_rank} has no GPU of its own: {visible} visible on this node; start at "
                       f"most {visible} processes per node, or name one device (--device cuda:0) for all to share")
    return torch.device("cuda", int(local_rank))


# ------------------------------------------------------------------------------------------------
# Phase 1: prepare
# ------------------------------------------------------------------------------------------------


def prepare(config: IndexJobConfig, formatter: Formatter) -> Prepared:
    corpus = read_corpus(config.corpus, on_bad_record=config.on_bad_record)
    encoded, kept, skipped = [], [], list(corpus.skipped)
    for record in corpus.records:
        try:
            encoded.append(formatter.encode(record))
            kept.append(record)
        except BadRecordError as exc:
            if config.on_bad_record == "error":
                raise
            skipped.append(SkippedRecord(location=exc.location, reason=exc.reason, source=record.source))
    if not kept:
        raise JobError("no records left to index" + (f" ({len(skipped)} skipped)" if skipped else ""))
    corpus.records = kept
    return Prepared(corpus, encoded, skipped)


def examples_table(prepared: Prepared, rows: range) -> pa.Table:
    records = [prepared.corpus.records[r] for r in rows]
    encoded = [prepared.encoded[r] for r in rows]
    return pa.table({
        "row": pa.array(list(rows), pa.int64()),
        "id": pa.array([r.id for r in records], pa.string()),
        "source": pa.array([r.source for r in records], pa.string()),
        "location": pa.array([r.location for r in records], pa.string()),
        "record": pa.array([json.dumps(r.record, ensure_ascii=False) for r in records], pa.string()),
        "num_tokens": pa.array([e.num_tokens for e in encoded], pa.int32()),
        "num_label_tokens": pa.array([e.num_label_tokens for e in encoded], pa.int32()),
        "truncated": pa.array([e.truncated for e in encoded], pa.bool_()),
    })


def token_statistics(encoded: list[Encoded]) -> dict:
    lengths = np.array([e.num_tokens for e in encoded])
    labels = np.array([e.num_label_tokens for e in encoded])
    return {
        "total": int(lengths.sum()),
        "label_tokens": int(labels.sum()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "truncated": int(sum(e.truncated for e in encoded)),
    }


# ------------------------------------------------------------------------------------------------
# Phase 2: compute
# ------------------------------------------------------------------------------------------------


class IndexJob:
    """Runs one indexing job; ``run()`` returns the summary (on rank 0) after publishing."""

    def __init__(self, config: IndexJobConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.rank, self.world_size = _world()

    # -- set-up --------------------------------------------------------------------------------

    def load(self) -> None:
        """Resolve the device and its batch limits (:meth:`IndexJobConfig.with_device_batching`), then
        load the compute core: tokenizer, formatter, model with its LoRA, projection, checkpoints."""
        device = rank_device(resolve_device(self.config.device))
        self.config = self.config.with_device_batching(device.type)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # libraries that allocate on "the" GPU use this one
        self.featurizer = ExampleFeaturizer(self.config.featurizer_settings(device), log=self.log)
        self.featurizer.load(device)

    @property
    def device(self) -> torch.device:
        return self.featurizer.device

    @property
    def tokenizer(self):
        return self.featurizer.tokenizer

    @property
    def formatter(self):
        return self.featurizer.formatter

    @property
    def peft_model(self):
        return self.featurizer.peft_model

    @property
    def checkpoints(self):
        return self.featurizer.checkpoints

    def _fingerprint(self, prepared: Prepared) -> dict:
        """Settings and input hashes that must match for a partial job to be resumed."""
        cfg = self.config
        return {
            "corpus": [{"name": s.name, "sha256": _path_sha256(s.path)} for s in cfg.corpus],
            "model_sha256": model_sha256(cfg.model),
            "tokenizer": self.formatter.describe(),
            "checkpoints": [{"name": c.spec.name, "weight": c.weight, "adapter": _path_sha256(c.spec.path)}
                            for c in self.checkpoints],
            "lora": lora_description(self.peft_model),
            "fresh_lora_seed": None if cfg.checkpoints else cfg.lora.init_seed,
            "gradient_type": cfg.gradient_type,
            "projection": cfg.projection.to_dict(),
            "batching": [cfg.max_tokens_per_batch, cfg.max_batch_size, cfg.shard_size],
            "dtype": cfg.dtype,
            "device_type": self.device.type,
            "on_bad_record": cfg.on_bad_record,
            "raw_features": cfg.raw_features,
            "extras": cfg.extras.to_dict(),
            "rows": prepared.num_rows,
        }

    def _open_work_dir(self, fingerprint: dict) -> bool:
        """Create or reuse the work directory; True when its shards are already finalised.

        The fingerprint lives in ``_shards/`` with the done markers, which finalisation removes
        just before the manifest appears; a directory with a (pending) manifest is only waiting
        to be committed and published.
        """
        work = self.config.work_dir
        job_file = work / SHARDS_DIR / JOB_FILE
        finalised = (work / MANIFEST_FILE).exists() or (work / PENDING_MANIFEST).exists()
        if self.rank == 0 and not finalised:
            if job_file.exists():
                if json.loads(job_file.read_text()) != fingerprint:
                    if not self.config.restart:
                        raise JobError(f"{work} holds a partial job with different settings or inputs; "
                                       "pass --restart to discard it, or delete it")
                    shutil.rmtree(work)
            elif work.exists():
                shutil.rmtree(work)  # no fingerprint: nothing finished in it can be trusted
            try:
                job_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = job_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
                os.replace(tmp, job_file)
            except OSError as err:
                raise StoreError(f"{job_file}: cannot write: {os_reason(err)}") from err
        _barrier()
        return finalised

    # -- compute -------------------------------------------------------------------------------

    def compute_features(self, encoded: list[Encoded], progress=None) -> Computed:
        """Every output of ``encoded`` (see :class:`~gradstore.indexer.featurize.Computed`), in the
        given order; needs :meth:`load` first."""
        return self.featurizer.compute(encoded, progress)

    def _compute_shard(self, prepared: Prepared, shard: int, progress) -> None:
        cfg = self.config
        rows = range(shard * cfg.shard_size, min(prepared.num_rows, (shard + 1) * cfg.shard_size))
        computed = self.compute_features([prepared.encoded[r] for r in rows], progress)
        row_ids = np.arange(rows.start, rows.stop)
        features = {name: FeatureBatch(rows=row_ids, **out) for name, out in computed.checkpoints.items()}
        examples = examples_table(prepared, rows)
        if computed.vog is not None:
            examples = examples.append_column("vog", pa.array(computed.vog, pa.float32()))
        write_shard(cfg.work_dir, shard, examples, features, raw_features=cfg.raw_features,
                    representations=computed.representations)

    # -- the whole job ---------------------------------------------------------------------------

    def run(self) -> JobSummary | None:
        cfg = self.config
        cfg.validate()
        # Only rank 0 looks into the work directory: it may delete it, and others' probes would race that.
        cfg.check_writable(with_work_dir=self.rank == 0)
        start = time.perf_counter()
        report = cfg.progress_file if self.rank == 0 else None
        write_progress_file(report, "prepare")
        _init_distributed(self.world_size)
        self.load()
        cfg = self.config  # with the device's batch limits
        prepared = prepare(cfg, self.formatter)
        finalised = self._open_work_dir(self._fingerprint(prepared))
        num_shards = math.ceil(prepared.num_rows / cfg.shard_size)
        done = set(range(num_shards)) if finalised else completed_shards(cfg.work_dir)
        mine = [s for s in range(self.rank, num_shards, self.world_size)]
        todo = [s for s in mine if s not in done]
        if done and self.rank == 0:
            self.log(f"resuming {cfg.work_dir}: {len(done)} of {num_shards} shards already done")

        def examples_in(shards: list[int]) -> int:
            return sum(min(prepared.num_rows, (s + 1) * cfg.shard_size) - s * cfg.shard_size for s in shards)

        passes = len(self.checkpoints)
        todo_examples = examples_in(todo)
        with _Progress(todo_examples * passes, enabled=cfg.progress and self.rank == 0, report=report,
                       reused=(examples_in(mine) - todo_examples) * passes) as progress:
            for shard in todo:
                self._compute_shard(prepared, shard, progress)
        _barrier()
        if self.rank != 0:
            return None
        progress.report_phase("finalize")
        compute_seconds = time.perf_counter() - start
        if prepared.skipped and not finalised:  # a finalised store has checksummed the report already
            report_path = cfg.work_dir / "skipped.jsonl"
            try:
                write_skipped_report(prepared.skipped, report_path)
            except OSError as err:
                raise StoreError(f"{report_path}: cannot write: {os_reason(err)}") from err
        summary = self._summary(prepared, progress, compute_seconds, len(todo), len(mine) - len(todo))
        manifest = finalize_store(cfg.work_dir, self._manifest_fields(prepared, summary), index_kind=cfg.index,
                                  index_memory_budget=cfg.index_memory_budget, expected_shards=num_shards)
        publish_store(cfg.work_dir, cfg.out, overwrite=cfg.overwrite)
        summary.store_bytes = sum(f.bytes for f in manifest.files.values())
        summary.wall_seconds = time.perf_counter() - start
        progress.report_phase("done")
        return summary

    def _summary(self, prepared: Prepared, progress, seconds: float, computed: int, reused: int) -> JobSummary:
        tokens = sum(e.num_tokens for e in prepared.encoded)
        busy = max(progress.seconds, 1e-9)
        return JobSummary(
            examples=prepared.num_rows, tokens=tokens, skipped=len(prepared.skipped),
            truncated=sum(e.truncated for e in prepared.encoded), checkpoints=len(self.checkpoints),
            wall_seconds=seconds, examples_per_second=progress.count / busy,
            tokens_per_second=progress.tokens / busy, store_bytes=0,
            oom_retries=self.featurizer.oom_retries, world_size=self.world_size,
            shards_computed=computed, shards_reused=reused,
        )

    def _manifest_fields(self, prepared: Prepared, summary: JobSummary) -> dict:
        from .. import __version__

        cfg = self.config
        lora = lora_description(self.peft_model)
        shapes = self.featurizer.grads.param_shapes
        lora.update(params={n: list(s) for n, s in shapes.items()}, num_params=sum(math.prod(s) for s in shapes.values()))
        lora["init_seed"] = None if cfg.checkpoints else cfg.lora.init_seed  # a fresh LoRA's weights depend on it
        return {
            "gradstore_version": __version__,
            "model": {"path": str(cfg.model.resolve()), "sha256": model_sha256(cfg.model),
                      "architecture": type(self.peft_model.get_base_model()).__name__,
                      "dtype": cfg.dtype, "device": self.device.type},
            "tokenizer": {"path": str((cfg.tokenizer or cfg.model).resolve()), **self.formatter.describe()},
            "lora": lora,
            "checkpoints": [{
                "name": c.spec.name,
                "path": str(c.spec.path.resolve()) if c.spec.path else None,
                "weight": c.weight,
                "learning_rate": recorded_learning_rate(c.spec.path),
                "adapter_sha256": file_sha256(c.spec.adapter_weights) if c.spec.path else None,
                "optimizer_sha256": _optimizer_sha256(c.spec.path) if cfg.gradient_type in ("adam", "less") else None,
            } for c in self.checkpoints],
            "gradient_type": cfg.gradient_type,
            "projection": cfg.projection.to_dict(),
            "features": {"dim": cfg.projection.dim, "dtype": "float16", "normalized": True},
            "counts": {"examples": prepared.num_rows, "by_source": _counts_by_source(prepared),
                       "skipped": len(prepared.skipped), "truncated": summary.truncated},
            "tokens": token_statistics(prepared.encoded),
            "shards": {"size": cfg.shard_size, "count": math.ceil(prepared.num_rows / cfg.shard_size)},
            "job": {"world_size": self.world_size, "compute_seconds": summary.wall_seconds,
                    "examples_per_second": summary.examples_per_second,
                    "tokens_per_second": summary.tokens_per_second, "oom_retries": summary.oom_retries,
                    "max_tokens_per_batch": cfg.max_tokens_per_batch, "max_batch_size": cfg.max_batch_size},
        }


def _counts_by_source(prepared: Prepared) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in prepared.corpus.records:
        counts[record.source] = counts.get(record.source, 0) + 1
    return counts


def _optimizer_sha256(path: Path | None) -> str | None:
    optimizer_file = find_optimizer_file(path) if path else None
    return file_sha256(optimizer_file) if optimizer_file else None


def _path_sha256(path: Path | None) -> str | None:
    """Hash of a file, or of every file under a folder (names and contents)."""
    if path is None:
        return None
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(file_sha256(child).encode())
    return digest.hexdigest()


def model_sha256(path: Path) -> str:
    """Hash of a model folder's weights, config and tokenizer files."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in MODEL_FILE_PATTERNS for p in Path(path).glob(pattern)})
    for child in files:
        digest.update(child.name.encode())
        digest.update(file_sha256(child).encode())
    return digest.hexdigest()


def write_progress_file(path: Path | None, phase: str, done: int = 0, total: int = 0,
                        examples_per_second: float | None = None, eta_seconds: float | None = None) -> None:
    """Atomically replace the JSON progress report at ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"done": done, "total": total, "examples_per_second": examples_per_second,
                                   "eta_seconds": eta_seconds, "phase": phase}))
        os.replace(tmp, path)
    except OSError as err:
        raise JobError(f"{path}: cannot write the progress report: {os_reason(err)}") from err


class _Progress:
    """A tqdm bar over examples (× checkpoints) with tokens/s, or a silent counter.

    With ``report``, it also keeps a JSON file ``{"done", "total", "examples_per_second",
    "eta_seconds", "phase"}`` up to date (at most about once a second, and at phase changes) for
    whoever supervises the job. ``done`` and ``total`` count examples × checkpoints of this rank's
    shards (the whole corpus in a single process), shards reused from an earlier run included.
    """

    REPORT_INTERVAL = 1.0

    def __init__(self, total: int, enabled: bool, report: Path | None = None, reused: int = 0):
        self.total, self.enabled = total, enabled
        self.count, self.tokens, self.seconds = 0, 0, 0.0
        self._bar = None
        self._report, self._reused, self._reported_at = report, reused, 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        if self.enabled and self.total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit="ex", desc="indexing", dynamic_ncols=True)
        self.report_phase("compute")
        return self

    def update(self, n: int, tokens: int) -> None:
        self.count += n
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(n)
            elapsed = time.perf_counter() - self._start
            self._bar.set_postfix(tok_s=f"{self.tokens / max(elapsed, 1e-9):,.0f}", refresh=False)
        if self._report is not None and time.perf_counter() - self._reported_at >= self.REPORT_INTERVAL:
            self.report_phase("compute")

    def report_phase(self, phase: str) -> None:
        if self._report is None:
            return
        self._reported_at = time.perf_counter()
        elapsed = self.seconds or self._reported_at - self._start
        rate = self.count / elapsed if self.count and elapsed > 0 else None
        remaining = self.total - self.count
        eta = 0.0 if remaining <= 0 else (remaining / rate if rate else None)
        write_progress_file(self._report, phase, self._reused + self.count, self._reused + self.total, rate, eta)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        if self._bar is not None:
            self._bar.close()
        return False
