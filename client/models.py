"""The wire contract of the gradstore REST API: request and response models.

These pydantic models are the single source of truth for the API: the service imports them to
validate requests and shape responses (and so to generate its OpenAPI schema), and the SDK uses
them to build requests and parse responses. They depend on pydantic only.

Conventions: scores are what the selection's strategy ranks by (for ``less``, LESS influences
``Σ_c w_c · cos(train_c, target_c)`` aggregated over target examples); rows are a datastore's
0-based example rows; ids are the corpus record ids. A select request is
:class:`gradstore.selection.options.SelectionOptions` (strategy, budget, filters; pydantic only,
like this module) plus targets and paging.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradstore.selection.options import ExportFormat, QualityFilter, SelectionOptions  # noqa: F401 (re-exported)
from gradstore.selection.options import exactly_one_schema as _exactly_one
from gradstore.selection.strategies.less import Aggregation  # noqa: F401 (re-exported)
# A datastore name: a plain folder name under the service root, 1-128 letters, digits and ._-,
# starting with a letter or digit, without ".." (so never a path). The service and the schema
# read this one definition.
DATASTORE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.?$"
DATASTORE_NAME_MAX_LENGTH = 128
# Where a job computes: what ``gradstore index --device`` takes.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda|cuda:[0-9]{1,2})$"
# A path on the service host as a job names it: no NUL (no file name holds one) and no line break
# (the job's corpus list has one entry per line), at most 4096 characters, 255 per name (what
# Linux can open); whether it exists and lies in an allowed folder is for the service to say.
HOST_PATH = {"pattern": r"^([^/\x00\n\r]{0,255}/)*[^/\x00\n\r]{0,255}$", "min_length": 1, "max_length": 4096}


# Jobs per page of ``GET /v1/jobs``.
JOB_PAGE_DEFAULT, JOB_PAGE_MAX = 100, 1000

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
GradientType = Literal["sgd", "sign", "adam", "less"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    # Responses ignore unknown fields so an older SDK keeps working against a newer service.
    model_config = ConfigDict(extra="ignore")


# -- errors ----------------------------------------------------------------------------------------


class ErrorBody(_Response):
    """Every error response: a stable machine-readable ``code``, a message, optional detail."""

    code: str
    message: str
    detail: Any = None


# -- datastores ------------------------------------------------------------------------------------


class CheckpointSummary(_Response):
    name: str
    weight: float
    learning_rate: float | None = None


class DatastoreSummary(_Response):
    name: str
    examples: int
    dim: int
    checkpoints: list[CheckpointSummary]
    gradient_type: str
    index: str | None = Field(None, description="FAISS index kind, or null when the store has none")


class DatastoreDetail(DatastoreSummary):
    sources: dict[str, int]
    model: dict[str, Any]
    lora: dict[str, Any]
    projection: dict[str, Any]
    tokens: dict[str, Any]
    created_at: str
    gradstore_version: str
    version: int | None = Field(None, description="the store's version: 1 when built, +1 for each append, "
                                                   "removal, compaction or quantised copy (None: an older service)")
    updated_at: str | None = Field(None, description="when this version was published")


class DatastoreList(_Response):
    datastores: list[DatastoreSummary]


class Example(_Response):
    row: int
    id: str
    source: str
    record: dict[str, Any]
    num_tokens: int
    num_label_tokens: int
    truncated: bool
    scores: list[ExampleScore] = Field(default_factory=list, description="the example's stored per-example "
                                       "values: loss, grad_norm and quality scores, per checkpoint")


class ExampleScore(_Response):
    name: str
    checkpoint: str | None = None
    value: float | None = Field(None, description="null for NaN or infinity")


# -- targets ---------------------------------------------------------------------------------------


class TargetRecords(_Model):
    """Target examples as corpus records; the service computes their (sgd) gradients with the
    datastore's own model, checkpoints and projection."""

    records: list[dict[str, Any]] = Field(min_length=1)
    subtask_field: str | None = Field(
        None, description="record field naming each target's subtask (LESS: mean within, max across); "
                          "absent or null: one subtask")


class TargetDatastore(_Model):
    """Targets from another datastore (built by the indexer with ``sgd`` gradients)."""

    datastore: str = Field(pattern=DATASTORE_NAME_PATTERN, min_length=1, max_length=DATASTORE_NAME_MAX_LENGTH)
    subtask_field: str | None = None


class TargetVectors(_Model):
    """Raw target vectors: per checkpoint name, one ``dim``-sized vector per target example."""

    vectors: dict[str, list[list[float]]] = Field(min_length=1)
    subtasks: list[str] | None = Field(None, description="subtask of each target example")


Targets = TargetRecords | TargetDatastore | TargetVectors


class ScoringOptions(_Model):
    checkpoints: list[str] | None = Field(None, description="checkpoints to use (default: all)")
    weights: dict[str, float] | None = Field(None, description="override the manifest's checkpoint weights")


# -- select ----------------------------------------------------------------------------------------


class SelectRequest(SelectionOptions):
    """A selection (strategy, budget, filters: :class:`SelectionOptions`) with its targets, for
    strategies that use them, and the first page's size."""

    targets: Targets | None = Field(None, description="the target examples (omit for target-free strategies)")
    page_size: int = Field(1000, ge=1, description="items in the first page; the rest by cursor")
    export: ExportFormat | None = Field(
        None, description="also write the selected records, in their original form, to a file")

    def options(self) -> SelectionOptions:
        """The selection alone (what the engine runs), without targets and paging."""
        return SelectionOptions.model_validate(
            self.model_dump(exclude={"targets", "page_size", "export"}, exclude_unset=True))


class StrategyInfo(_Response):
    name: str
    summary: str
    needs_targets: Literal["required", "optional", "none"]
    features: list[str]
    cost: str
    options_schema: dict[str, Any] = Field(description="JSON schema of the strategy's options")


class StrategyList(_Response):
    strategies: list[StrategyInfo]


class SelectedExample(_Response):
    rank: int
    row: int
    id: str
    source: str
    score: float
    subtask_scores: dict[str, float]


class SelectPage(_Response):
    datastore: str
    selection_id: str
    total: int = Field(description="examples in the whole selection")
    pool: int = Field(description="examples eligible after the source and quality filters")
    strategy: dict[str, Any] = Field(default_factory=dict, description="the strategy that ran, with its options")
    report: dict[str, Any] = Field(default_factory=dict,
                                   description="what the strategy and the filters report (thresholds, a trace)")
    items: list[SelectedExample]
    next_cursor: str | None = None
    export_path: str | None = None


# -- influence and similar -------------------------------------------------------------------------


class InfluenceRequest(ScoringOptions):
    targets: Targets
    k: int = Field(10, ge=1)


class Neighbor(_Response):
    row: int
    id: str
    source: str
    score: float


class TargetInfluence(_Response):
    target: int = Field(description="index of the target example in the request")
    neighbors: list[Neighbor]


class InfluenceResponse(_Response):
    datastore: str
    exact: bool = Field(description="true when the index is exact (Flat)")
    results: list[TargetInfluence]


class SimilarRequest(_Model):
    model_config = ConfigDict(json_schema_extra=_exactly_one("id", {"type": "string"}, "vectors", {"type": "object"}))

    id: str | None = Field(None, description="a training example id of this datastore")
    vectors: dict[str, list[float]] | None = Field(None, description="or one vector per checkpoint")
    k: int = Field(10, ge=1)
    include_self: bool = False

    @model_validator(mode="after")
    def _one_query(self):
        if (self.id is None) == (self.vectors is None):
            raise ValueError("give exactly one of id or vectors")
        return self


class SimilarResponse(_Response):
    datastore: str
    neighbors: list[Neighbor]


# -- jobs ------------------------------------------------------------------------------------------


PathText = Annotated[str, Field(**HOST_PATH)]

_APPEND = {"required": ["append"], "properties": {"append": {"const": True}}}

# What the service refuses whatever the files: run and checkpoints together; adam / less (the
# default) without either, unless appending (the store's checkpoints are used); no model, unless
# appending (the store's model); append with overwrite; replace without append.
_JOB_RULES = {"allOf": [
    {"not": {"required": ["run", "checkpoints"],
             "properties": {"run": {"type": "string"}, "checkpoints": {"type": "array", "minItems": 1}}}},
    {"anyOf": [{"required": ["gradient_type"], "properties": {"gradient_type": {"enum": ["sgd", "sign"]}}},
               {"required": ["run"], "properties": {"run": {"type": "string"}}},
               {"required": ["checkpoints"], "properties": {"checkpoints": {"type": "array", "minItems": 1}}},
               _APPEND]},
    {"anyOf": [{"required": ["model"], "properties": {"model": {"type": "string"}}}, _APPEND]},
    {"not": {"required": ["append", "overwrite"],
             "properties": {"append": {"const": True}, "overwrite": {"const": True}}}},
    {"anyOf": [{"not": {"required": ["replace"], "properties": {"replace": {"const": True}}}}, _APPEND]},
]}


class IndexJobRequest(_Model):
    """An indexing job; paths are on the service host, inside its allowed input folders."""

    model_config = ConfigDict(json_schema_extra=_JOB_RULES)

    datastore: str = Field(pattern=DATASTORE_NAME_PATTERN, min_length=1, max_length=DATASTORE_NAME_MAX_LENGTH,
                           description="name of the datastore to create under the service root (or, with "
                                       "append, to add to)")
    corpus: list[PathText] = Field(min_length=1, max_length=1_000_000, description="corpus files ([NAME=]PATH)")
    model: PathText | None = Field(None, description="model folder (required unless append: the store's)")
    tokenizer: PathText | None = None
    checkpoints: list[PathText] = Field(default_factory=list, max_length=256, description="[NAME=]DIR[:WEIGHT]")
    run: PathText | None = Field(None, description="a warmup run folder, instead of checkpoints")
    gradient_type: GradientType = "adam"
    # Upper bounds far above any real job, so that absurd values are refused here, not in the worker.
    proj_dim: int = Field(8192, ge=1, le=1 << 20)
    # Within +-2**53, so that a number JSON writes as a float still names the same integer.
    seed: int = Field(0, ge=-(1 << 53), le=1 << 53)
    max_length: int = Field(2048, ge=1, le=1 << 20)
    lora_r: int = Field(8, ge=1, le=1 << 16)
    lora_alpha: float = 16.0
    on_bad_record: Literal["error", "skip"] = "error"
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    overwrite: bool = False
    append: bool = Field(False, description="add the corpus to the existing datastore as its next version, "
                         "indexed with the store's recorded settings: a setting left out takes the store's "
                         "value; one given with another value is refused")
    replace: bool = Field(False, description="with append: a record whose id the store already holds replaces "
                          "that example (without it, such ids fail the job)")


class JobProgress(_Response):
    done: int = 0
    total: int = 0
    examples_per_second: float | None = None
    eta_seconds: float | None = None


class Job(_Response):
    id: str
    status: JobStatus
    request: IndexJobRequest
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    error: str | None = None
    attempts: int = 0


class JobList(_Response):
    """One page of jobs, newest first; ``next_cursor`` fetches the next (null on the last page)."""

    jobs: list[Job]
    next_cursor: str | None = None


# -- health ----------------------------------------------------------------------------------------


class Health(_Response):
    status: Literal["ok"]


class StoreState(_Response):
    name: str
    loaded: bool
    error: str | None = None


class Readiness(_Response):
    ready: bool
    datastores: list[StoreState]


# -- overview: stats, example pages, the pool map, selection summaries ------------------------------


class Histogram(_Response):
    """Counts of finite values in equal-width bins (``edges`` has one more entry than ``counts``);
    NaN and infinite values are counted in ``missing``."""

    name: str = Field(description="the column: num_tokens, loss, grad_norm, a quality score, or score")
    checkpoint: str | None = Field(None, description="the checkpoint, for per-checkpoint columns")
    edges: list[float]
    counts: list[int]
    count: int = Field(description="finite values binned")
    missing: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None


class DatastoreStats(_Response):
    datastore: str
    examples: int
    sources: dict[str, int] = Field(description="examples per corpus source")
    histograms: list[Histogram]
    scores: list[str] = Field(description="the quality score columns the store has")


class ExamplePage(_Response):
    datastore: str
    total: int = Field(description="examples matching the query (all, without one)")
    offset: int
    limit: int
    query: str | None = None
    items: list[Example]


# The map's PCA works on the sample's n x n Gram matrix: n = 5000 is 200 MB of float64 and seconds of work.
MAP_MAX_SAMPLE = 5000


class MapRequest(_Model):
    """A 2-D PCA map of a seeded sample of the pool, with rows and targets placed on it."""

    sample: int = Field(2000, ge=2, le=MAP_MAX_SAMPLE,
                        description="pool examples to sample (all when the pool is smaller)")
    seed: int = Field(0, ge=0, le=(1 << 32) - 1)
    rows: list[int] = Field(default_factory=list, description="rows to place on the map too (e.g. a selection)")
    targets: Targets | None = Field(None, description="targets to place on the map")


class MapPoints(_Response):
    x: list[float]
    y: list[float]
    rows: list[int] | None = None
    sources: list[str] | None = None
    subtasks: list[str] | None = None


class MapResponse(_Response):
    datastore: str
    examples: int = Field(description="examples in the datastore")
    explained_variance: list[float] = Field(description="share of the sample's variance along each axis")
    sample: MapPoints
    rows: MapPoints
    targets: MapPoints | None = None


class SourceShare(_Response):
    source: str
    pool: int = Field(description="eligible examples of this source")
    selected: int


class SubtaskSummary(_Response):
    name: str
    targets: int | None = Field(None, description="target examples of this subtask (null when unknown)")
    mean_score: float | None = Field(None, description="mean subtask score of the selected examples")
    best_for: int = Field(description="selected examples that score highest on this subtask")


class SelectionSummary(_Response):
    datastore: str
    selection_id: str | None = None
    total: int
    pool: int
    cutoff: float | None = Field(None, description="the lowest selected score")
    pool_scores: Histogram = Field(description="scores of the whole eligible pool (of the selection alone when "
                                               "pool_scores_known is false)")
    pool_scores_known: bool = True
    selected_scores: Histogram = Field(description="scores of the selection, in the same bins")
    composition: list[SourceShare]
    subtasks: list[SubtaskSummary]


class UIConfig(_Response):
    """What the web UI needs before it has a key (``GET /ui/config.json``, no key needed)."""

    auth_required: bool
    api_key_header: str
    version: str
