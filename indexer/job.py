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

**Appending** (``append``): the new corpus is indexed with the store's own settings (recorded in
its manifest's ``settings``; a setting given explicitly that differs, or a model, tokenizer or
checkpoint whose files changed since, is refused before any compute, naming each difference), its
rows numbered after the store's, into a new segment that :func:`gradstore.datastore.publish_append`
publishes as the store's next version. An id already in the store is refused unless ``replace``
is set, which marks the old row removed in the same version.

The work directory (:func:`gradstore.datastore.work_dir_of`: ``.<name>.partial`` beside the
output) holds a ``job.json`` fingerprint of the settings and inputs. Running the same job again resumes it: finished shards are kept and
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .batching import default_batching
from .checkpoints import CheckpointSpec, file_sha256, recorded_learning_rate
from .corpus import Corpus, CorpusSource, SkippedRecord, read_corpus, write_skipped_report
from gradstore.datastore import (MANIFEST_FILE, PENDING_MANIFEST, SHARDS_DIR, Datastore, FeatureBatch,
                                 SegmentFiles, SettingsMismatchError, completed_shards, finalize_segment,
                                 finalize_store, os_reason, publish_append, publish_store, work_dir_of, write_shard)
from gradstore.datastore.layout import INDEX_KINDS
from gradstore.datastore.versions import next_segment_name

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
    extras: ExtraFeatures = field(default_factory=ExtraFeatures)  # representations, gradient spectra, VoG
    on_bad_record: str = "error"
    overwrite: bool = False
    append: bool = False  # add the corpus to the existing store at ``out`` (its settings, a new version)
    replace: bool = False  # with append: new records whose id the store has replace the old ones
    restart: bool = False
    progress: bool = True
    progress_file: Path | None = None  # rank 0 keeps a JSON progress report here (see _Progress)
    # Unpickle optimizer files that weights_only=True refuses (runs their code): the CLI's explicit
    # --trust-pickled-checkpoints only; the service never sets it.
    trust_pickled_checkpoints: bool = False

    def validate(self) -> None:
        if self.gradient_type not in GRADIENT_TYPES:
            raise JobError(f"unknown gradient type {self.gradient_type!r}: expected one of {GRADIENT_TYPES}")
        if self.gradient_type in ("adam", "less") and not any(c.path for c in self.checkpoints):
            raise JobError(f"gradient type {self.gradient_type!r} needs checkpoints with optimizer state "
                           "(--checkpoint DIR); use 'sgd' or 'sign' for a fresh LoRA")
        if self.index not in INDEX_KINDS:
            raise JobError(f"unknown index kind {self.index!r}: expected one of {', '.join(INDEX_KINDS)}")
        names = [c.name for c in self.checkpoints]
        if len(set(names)) != len(names):
            raise JobError(f"checkpoint names must be unique, got {names}; name them with NAME=DIR")
        for positive in ("max_length", "max_tokens_per_batch", "max_batch_size", "shard_size"):
            if getattr(self, positive) is not None and getattr(self, positive) < 1:
                raise JobError(f"{positive} must be positive, got {getattr(self, positive)}")
        if self.append:
            if self.overwrite:
                raise JobError("--append adds to the store at --out; --overwrite would replace it: give one")
            if not (self.out / MANIFEST_FILE).exists():
                raise JobError(f"{self.out}: no datastore to append to (no {MANIFEST_FILE}); build one first")
        elif self.replace:
            raise JobError("--replace goes with --append")
        elif self.out.exists() and not self.overwrite:
            raise JobError(f"{self.out} already exists; pass --overwrite to replace it (or --append to add to it)")

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
        return work_dir_of(self.out)

    def settings(self) -> dict:
        """What an append to the store this job writes must reproduce (the manifest's
        ``settings.config``; :meth:`from_settings` reads it back)."""
        return {
            "model": str(self.model.resolve()), "tokenizer": str(self.tokenizer.resolve()) if self.tokenizer else None,
            "checkpoints": [{"name": c.name, "path": str(c.path.resolve()) if c.path else None, "weight": c.weight}
                            for c in self.checkpoints],
            "lora": {**self.lora.to_dict(), "target_modules": list(self.lora.target_modules or []) or None},
            "gradient_type": self.gradient_type, "projection": self.projection.to_dict(),
            "max_length": self.max_length, "template": self.template,
            "max_tokens_per_batch": self.max_tokens_per_batch, "max_batch_size": self.max_batch_size,
            "shard_size": self.shard_size, "dtype": self.dtype, "index": self.index,
            "index_memory_budget": self.index_memory_budget, "extras": self.extras.to_dict(),
            "on_bad_record": self.on_bad_record,
        }

    @classmethod
    def from_settings(cls, settings: dict, **fields) -> "IndexJobConfig":
        """A config with a store's recorded settings (see :meth:`settings`), then ``fields``."""
        lora = dict(settings["lora"])
        lora["target_modules"] = tuple(lora["target_modules"]) if lora.get("target_modules") else None
        return cls(
            model=Path(settings["model"]), tokenizer=Path(settings["tokenizer"]) if settings["tokenizer"] else None,
            checkpoints=[CheckpointSpec(name=c["name"], path=Path(c["path"]) if c["path"] else None, weight=c["weight"])
                         for c in settings["checkpoints"]],
            lora=LoraSpec(**lora), gradient_type=settings["gradient_type"],
            projection=ProjectionSpec.from_dict(settings["projection"]), max_length=settings["max_length"],
            template=settings["template"], max_tokens_per_batch=settings["max_tokens_per_batch"],
            max_batch_size=settings["max_batch_size"], shard_size=settings["shard_size"], dtype=settings["dtype"],
            index=settings["index"], index_memory_budget=settings["index_memory_budget"],
            extras=ExtraFeatures(**settings["extras"]), on_bad_record=settings["on_bad_record"], **fields)

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
            device=self.device if device is None else device, extras=self.extras,
            trust_pickled_checkpoints=self.trust_pickled_checkpoints)

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


def config_for_append(given: IndexJobConfig, given_settings: Sequence[str]) -> IndexJobConfig:
    """The config of an append to the store at ``given.out``: the store's recorded settings, with
    the ``given_settings`` taken from ``given`` (the job then refuses values that would change the
    features) and ``given``'s corpus, output, device and run options. A setting is a field name, or
    ``field.attribute`` for one part of a spec (``projection.dim``): the rest of the spec stays the
    store's."""
    from gradstore.datastore import Manifest

    manifest = Manifest.load(given.out / MANIFEST_FILE)
    recorded = manifest.settings.get("config")
    if recorded is None:
        raise JobError(f"{given.out}: the store records no indexing settings (it was migrated from schema "
                       f"version 1); append by giving every setting it was indexed with (--model, --checkpoint "
                       f"or --run, --proj-dim, ...): they are checked against its manifest")
    config = IndexJobConfig.from_settings(recorded, corpus=given.corpus, out=given.out)
    config = replace(config, **{f.name: getattr(given, f.name) for f in fields(IndexJobConfig)
                                if f.name in given_settings or f.name not in recorded})
    parts: dict[str, dict[str, object]] = {}
    for setting in given_settings:
        name, _, attribute = setting.partition(".")
        if attribute and name not in given_settings:
            parts.setdefault(name, {})[attribute] = getattr(getattr(given, name), attribute)
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in parts.items()})


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


@dataclass
class AppendTarget:
    """The store an append adds to, as it was when the append started."""

    store: Datastore
    segment: str  # the new segment's name
    replaced_rows: np.ndarray  # live rows whose ids the new records take over

    @property
    def first_row(self) -> int:
        return self.store.num_rows


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


def examples_table(prepared: Prepared, rows: range, first_row: int = 0) -> pa.Table:
    """The examples of ``rows`` of the prepared corpus, stored as rows ``first_row + r``."""
    records = [prepared.corpus.records[r] for r in rows]
    encoded = [prepared.encoded[r] for r in rows]
    return pa.table({
        "row": pa.array([first_row + r for r in rows], pa.int64()),
        "id": pa.array([r.id for r in records], pa.string()),
        "source": pa.array([r.source for r in records], pa.string()),
        "location": pa.array([r.location for r in records], pa.string()),
        "record": pa.array([json.dumps(r.record, ensure_ascii=False) for r in records], pa.string()),
        "num_tokens": pa.array([e.num_tokens for e in encoded], pa.int32()),
        "num_label_tokens": pa.array([e.num_label_tokens for e in encoded], pa.int32()),
        "truncated": pa.array([e.truncated for e in encoded], pa.bool_()),
    })


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

    def _compute_shard(self, prepared: Prepared, shard: int, first_row: int, progress) -> None:
        cfg = self.config
        rows = range(shard * cfg.shard_size, min(prepared.num_rows, (shard + 1) * cfg.shard_size))
        computed = self.compute_features([prepared.encoded[r] for r in rows], progress)
        row_ids = np.arange(rows.start, rows.stop) + first_row
        features = {name: FeatureBatch(rows=row_ids, **out) for name, out in computed.checkpoints.items()}
        examples = examples_table(prepared, rows, first_row)
        if computed.vog is not None:
            examples = examples.append_column("vog", pa.array(computed.vog, pa.float32()))
        write_shard(cfg.work_dir, shard, examples, features, representations=computed.representations)

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
        if cfg.append and self.rank == 0 and (cfg.work_dir / PENDING_MANIFEST).exists():
            return self._complete_append(start)
        prepared = prepare(cfg, self.formatter)
        target = self._append_target(prepared) if cfg.append else None
        first_row = target.first_row if target else 0
        fingerprint = self._fingerprint(prepared)
        if target is not None:
            fingerprint["append_to"] = {"version": target.store.version, "segment": target.segment,
                                        "replaced_rows": target.replaced_rows.tolist()}
        finalised = self._open_work_dir(fingerprint)
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
                self._compute_shard(prepared, shard, first_row, progress)
        _barrier()
        if self.rank != 0:
            return None
        progress.report_phase("finalize")
        compute_seconds = time.perf_counter() - start
        if prepared.skipped and not finalised:  # a finalised store has checksummed the report already
            report_path = SegmentFiles(cfg.work_dir).skipped
            try:
                write_skipped_report(prepared.skipped, report_path)
            except OSError as err:
                raise StoreError(f"{report_path}: cannot write: {os_reason(err)}") from err
        summary = self._summary(prepared, progress, compute_seconds, len(todo), len(mine) - len(todo))
        if target is not None:
            segment = finalize_segment(cfg.work_dir, target.segment, first_row, num_shards)
            manifest = publish_append(cfg.out, cfg.work_dir, target.store.version, segment, target.replaced_rows,
                                      self._job_fields(summary), cfg.index_memory_budget)
        else:
            manifest = finalize_store(cfg.work_dir, self._manifest_fields(summary), index_kind=cfg.index,
                                      index_memory_budget=cfg.index_memory_budget, expected_shards=num_shards)
            publish_store(cfg.work_dir, cfg.out, overwrite=cfg.overwrite)
        summary.store_bytes = sum(f.bytes for f in manifest.files.values())
        summary.wall_seconds = time.perf_counter() - start
        progress.report_phase("done")
        return summary

    def _complete_append(self, start: float) -> JobSummary:
        """Finish the publication of an append whose new version was decided before it stopped."""
        from gradstore.datastore import Manifest

        pending = Manifest.load(self.config.work_dir / PENDING_MANIFEST)
        self.log(f"completing the append to {self.config.out} (version {pending.version})")
        manifest = publish_append(self.config.out, self.config.work_dir, pending.version - 1, None,
                                  np.empty(0, np.int64), pending.job)
        added = manifest.history[-1].rows_added
        return JobSummary(examples=added, tokens=0, skipped=0, truncated=0, checkpoints=len(manifest.checkpoints),
                          wall_seconds=time.perf_counter() - start, examples_per_second=0.0, tokens_per_second=0.0,
                          store_bytes=sum(f.bytes for f in manifest.files.values()), oom_retries=0, world_size=1,
                          shards_computed=0, shards_reused=0)

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

    def _store_fields(self) -> dict:
        """The manifest sections that say what the features are (an append must match them)."""
        cfg = self.config
        lora = lora_description(self.peft_model)
        shapes = self.featurizer.grads.param_shapes
        lora.update(params={n: list(s) for n, s in shapes.items()}, num_params=sum(math.prod(s) for s in shapes.values()))
        lora["init_seed"] = None if cfg.checkpoints else cfg.lora.init_seed  # a fresh LoRA's weights depend on it
        return {
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
        }

    def _manifest_fields(self, summary: JobSummary) -> dict:
        from .. import __version__

        cfg = self.config
        return {
            "gradstore_version": __version__,
            **self._store_fields(),
            "settings": {"config": cfg.settings()},
            "shards": {"size": cfg.shard_size},
            "job": self._job_fields(summary),
        }

    def _job_fields(self, summary: JobSummary) -> dict:
        cfg = self.config
        return {"world_size": self.world_size, "compute_seconds": summary.wall_seconds,
                "examples_per_second": summary.examples_per_second,
                "tokens_per_second": summary.tokens_per_second, "oom_retries": summary.oom_retries,
                "max_tokens_per_batch": cfg.max_tokens_per_batch, "max_batch_size": cfg.max_batch_size,
                "device": self.device.type}

    # -- append ------------------------------------------------------------------------------------

    def _append_target(self, prepared: Prepared) -> AppendTarget:
        """The store to append to, once the new records are checked against it: settings that
        produce the same features (:func:`settings_differences`), ids new to it (or replacing)."""
        cfg = self.config
        store = Datastore.open(cfg.out)
        differences = settings_differences(store.manifest.model_dump(mode="json"), self._store_fields())
        differences += _extras_differences(store, cfg)
        if differences:
            raise SettingsMismatchError(
                f"{cfg.out}: the new records would be indexed differently from the store, so their features "
                f"would not be comparable: " + "; ".join(differences)
                + ". Append with the store's own model, checkpoints and settings (flags left out take the "
                  "store's values), or index a new store")
        ids = [record.id for record in prepared.corpus.records]
        taken = [id for id in ids if _has_id(store, id)]
        if taken and not cfg.replace:
            raise JobError(f"{cfg.out}: {len(taken)} of the new records have ids the store already holds "
                           f"(e.g. {taken[:3]}); pass --replace to replace those examples, or give new ids")
        replaced = np.array(sorted(store.row_of(id) for id in taken), dtype=np.int64)
        return AppendTarget(store, next_segment_name(cfg.out, store.manifest), replaced)

# Manifest fields that say where a file was or what ran it, not what the features are.
_LOCATION_FIELDS = {"path", "device"}
_COMPARED_SECTIONS = ("model", "tokenizer", "lora", "checkpoints", "gradient_type", "projection")


def settings_differences(store: dict, ours: dict, where: str = "") -> list[str]:
    """Each way ``ours`` (a job's :meth:`IndexJob._store_fields`) differs from a store's manifest,
    as ``"field: store X, new Y"``; paths and the device are not compared (a moved model with the
    same files gives the same features), hashes are."""
    differences = []
    for key in (_COMPARED_SECTIONS if not where else sorted(set(store) | set(ours))):
        if key in _LOCATION_FIELDS:
            continue
        theirs, mine, name = store.get(key), ours.get(key), f"{where}{key}"
        if isinstance(theirs, dict) and isinstance(mine, dict):
            differences += settings_differences(theirs, mine, f"{name}.")
        elif isinstance(theirs, list) and isinstance(mine, list) and len(theirs) == len(mine) \
                and all(isinstance(t, dict) for t in theirs + mine):
            for i, (t, m) in enumerate(zip(theirs, mine)):
                differences += settings_differences(t, m, f"{name}[{i}].")
        elif theirs != mine:
            differences.append(f"{name}: store {theirs!r}, new {mine!r}")
    return differences


def _extras_differences(store: Datastore, cfg: IndexJobConfig) -> list[str]:
    extras = store.manifest.extras
    theirs = {"representations": extras.representations is not None, "gradient_spectra": extras.gradient_spectra,
              "vog": extras.vog}
    mine = {"representations": cfg.extras.representations, "gradient_spectra": cfg.extras.gradient_spectra,
            "vog": cfg.extras.vog and len(store.checkpoint_names) > 1}
    return [f"extras.{k}: store {theirs[k]}, new {mine[k]}" for k in theirs if theirs[k] != mine[k]]


def _has_id(store: Datastore, id: str) -> bool:
    try:
        store.row_of(id)
    except KeyError:
        return False
    return True


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
