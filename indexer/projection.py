"""Random projections of per-example gradients, identical on every device and in every process.

The projection of a (transformed) gradient ``g`` is ``Σ_p R_pᵀ vec(g_p)``, summed over the LoRA
parameters ``p``, where ``R_p`` is an ``(numel_p, k)`` random sign matrix. Stacking the ``R_p`` in
parameter order gives one matrix over the flattened gradient, so this is exactly the global
projection LESS uses; it is simply never materialised as a whole. Two kinds:

``sjlt`` (the default): a sparse Johnson-Lindenstrauss transform. Each gradient coordinate goes to
``s`` of the ``k`` outputs, one in each of ``s`` blocks of ``k/s`` outputs, with a random sign and
weight ``1/sqrt(s)``. Its cost per example is ``s · numel`` instead of ``k · numel``, and for
inner products its error variance, ``(‖x‖²‖y‖² + ⟨x,y⟩² − 2 Σ_i x_i² y_i²) / k``, is the same as
a dense Rademacher matrix's (and within the ``Σ x_i² y_i²`` term of a dense Gaussian's).

``rademacher``: the dense ``±1/sqrt(k)`` matrix (TRAK's and LESS's kind), generated in blocks.

Every entry is a pure function of ``(seed, parameter name, parameter shape, k)`` (and ``s``) and
its position, computed with a counter-based integer hash in plain int64 tensor arithmetic that
never overflows. The same bits therefore come out on CPU and on any GPU, in any process, with any
torch version: a service or another machine reproduces the projection from the values stored in
the datastore manifest. (Projectors driven by a device RNG do not have this property.)

``mix32`` is the "lowbias32" integer finaliser (xor-shift 16, ×0x7feb352d, xor-shift 15,
×0x846ca68b, xor-shift 16, all mod 2**32), ``i`` indexes ``vec(g_p)`` in row-major (C) order, and
``key`` is the first 4 bytes (little-endian) of the SHA-256 of the text shown.

``gradstore-sjlt-v1``, for parameter ``name`` of shape ``S``, ``s`` non-zeros, block ``b = k / s``:

    key       = sha256("gradstore-sjlt-v1|{seed}|{name}|{S}|{k}|{s}")
    h[i, j]   = mix32(mix32((key + i) mod 2**32) XOR mix32((j * 0x9E3779B9) mod 2**32)),  j < s
    R[i, j·b + (h[i, j] mod b)] = (+1 if h[i, j] < 2**31 else -1) / sqrt(s), other entries 0

``gradstore-rademacher-v1``, for parameter ``name`` of shape ``S``:

    key       = sha256("gradstore-rademacher-v1|{seed}|{name}|{S}|{k}")
    row_h[i]  = mix32((key + i) mod 2**32)
    col_h[j]  = mix32((j * 0x9E3779B9) mod 2**32)
    R[i, j]   = (+1 if mix32(row_h[i] XOR col_h[j]) < 2**31 else -1) / sqrt(k)
"""

from __future__ import annotations

import hashlib
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

HASH_VERSION = "gradstore-rademacher-v1"
SJLT_VERSION = "gradstore-sjlt-v1"
VERSIONS = {"sjlt": SJLT_VERSION, "rademacher": HASH_VERSION}
PROJECTION_KINDS = tuple(VERSIONS)
DEFAULT_NONZEROS = 4

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
# Rows generated per block are capped so one block of int64 hash state stays near 128 MiB.
_BLOCK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that defines a projection; stored in the datastore manifest."""

    kind: str = "sjlt"
    dim: int = 8192
    seed: int = 0
    nonzeros: int | None = None  # sjlt only: outputs per gradient coordinate (default 4)
    version: str | None = None  # the hash version of ``kind``; filled in

    def __post_init__(self):
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}: expected one of {PROJECTION_KINDS}")
        if self.dim < 1:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind == "sjlt":
            nonzeros = DEFAULT_NONZEROS if self.nonzeros is None else self.nonzeros
            if nonzeros < 1 or self.dim % nonzeros:
                raise ValueError(f"sjlt needs a number of non-zeros that divides the dim {self.dim}, got {nonzeros}")
            object.__setattr__(self, "nonzeros", nonzeros)
        elif self.nonzeros is not None:
            raise ValueError(f"nonzeros applies to the sjlt projection only, not {self.kind!r}")
        version = self.version or VERSIONS[self.kind]
        if version != VERSIONS[self.kind]:
            raise ValueError(f"projection version {version!r} is not supported by this gradstore "
                             f"(supported for {self.kind}: {VERSIONS[self.kind]!r})")
        object.__setattr__(self, "version", version)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionSpec":
        return cls(**data)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x < 2**32`` without int64 overflow."""
    low, high = constant & _MASK16, constant >> 16
    return (x * low + (((x * high) & _MASK16) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 finaliser on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def param_key(seed: int, name: str, shape: tuple[int, ...], dim: int, version: str = HASH_VERSION,
              *extra: int) -> int:
    fields = [version, str(seed), name, str(tuple(int(s) for s in shape)), str(dim), *map(str, extra)]
    return int.from_bytes(hashlib.sha256("|".join(fields).encode()).digest()[:4], "little")


def rademacher_block(seed: int, name: str, shape: tuple[int, ...], dim: int, rows: range,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows ``rows`` of ``R_p`` as an int8 tensor of ±1, shape ``(len(rows), dim)``."""
    key = param_key(seed, name, shape, dim)
    row_index = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device)
    col_index = torch.arange(dim, dtype=torch.int64, device=device)
    row_h = mix32((row_index + key) & _MASK32)
    col_h = mix32(_mul32(col_index, 0x9E3779B9))
    bits = mix32(row_h[:, None] ^ col_h[None, :]) >> 31
    return (1 - 2 * bits).to(torch.int8)


class Projector(ABC):
    """Projects per-example gradients of named parameters to ``spec.dim`` dimensions."""

    def __init__(self, spec: ProjectionSpec):
        self.spec = spec

    @abstractmethod
    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``grads``: ``(batch, *param_shape)``; returns this parameter's ``(batch, dim)`` share."""

    def project_many(self, params: list[tuple[str, tuple[int, ...]]], grads: torch.Tensor) -> torch.Tensor:
        """``grads``: ``(batch, Σ numel)``, the gradients of ``params`` (``(name, shape)`` pairs)
        flattened and concatenated in order; returns the sum of their ``(batch, dim)`` shares."""
        out, offset = None, 0
        for name, shape in params:
            numel = math.prod(shape)
            part = self.project(name, grads[:, offset:offset + numel].reshape(grads.shape[0], *shape))
            out = part if out is None else out + part
            offset += numel
        return out


class _MatrixProjector(Projector):
    """A projector whose per-parameter matrices are generated on ``device`` in ``dtype`` and kept
    for reuse while their total size stays within ``cache_bytes`` (then regenerated per call)."""

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_bytes: int = 2 << 30):
        super().__init__(spec)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    def _fits(self, size: int) -> bool:
        return self._cached_bytes + size <= self.cache_bytes

    def _keep(self, key: tuple, matrix: torch.Tensor, size: int) -> torch.Tensor:
        """Cache ``matrix`` (``size`` bytes) under ``key`` if it fits; returns it either way."""
        if self._fits(size):
            self._cache[key] = matrix
            self._cached_bytes += size
        return matrix


class RademacherProjector(_MatrixProjector):
    """Dense Rademacher projection, generated blockwise and cached up to ``cache_bytes``.

    Matrices are generated on ``device`` (the hash is device-independent) and kept for reuse while
    the cache has room; past that, blocks are regenerated on every call, so memory stays bounded
    by one block whatever the model size.
    """

    def _blocks(self, name: str, shape: tuple[int, ...]):
        numel = math.prod(shape)
        rows_per_block = max(1, _BLOCK_ENTRIES // self.spec.dim)
        for start in range(0, numel, rows_per_block):
            rows = range(start, min(numel, start + rows_per_block))
            block = rademacher_block(self.spec.seed, name, shape, self.spec.dim, rows, self.device)
            yield rows, block.to(self.dtype)

    def _matrix(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The whole ``R_p`` if it is (or can be) cached, else None."""
        cached = self._cache.get((name, shape))
        if cached is not None:
            return cached
        size = math.prod(shape) * self.spec.dim * torch.tensor([], dtype=self.dtype).element_size()
        if not self._fits(size):  # too large to keep: project block by block instead
            return None
        return self._keep((name, shape), torch.cat([block for _, block in self._blocks(name, shape)]), size)

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        shape = tuple(grads.shape[1:])
        flat = grads.reshape(grads.shape[0], -1).to(self.dtype)
        scale = 1.0 / math.sqrt(self.spec.dim)
        matrix = self._matrix(name, shape)
        if matrix is not None:
            return (flat @ matrix) * scale
        out = torch.zeros(flat.shape[0], self.spec.dim, dtype=self.dtype, device=flat.device)
        for rows, block in self._blocks(name, shape):
            out += flat[:, rows.start:rows.stop] @ block
        return out * scale


def sjlt_coordinates(seed: int, name: str, shape: tuple[int, ...], dim: int, nonzeros: int,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Output index and sign (±1, int8) of every non-zero of ``R_p``, each ``(nonzeros, numel)``."""
    key = param_key(seed, name, shape, dim, SJLT_VERSION, nonzeros)
    block = dim // nonzeros
    row_h = mix32((torch.arange(math.prod(shape), dtype=torch.int64, device=device) + key) & _MASK32)
    slot_h = mix32(_mul32(torch.arange(nonzeros, dtype=torch.int64, device=device), 0x9E3779B9))
    h = mix32(row_h[None, :] ^ slot_h[:, None])
    offsets = torch.arange(nonzeros, dtype=torch.int64, device=device)[:, None] * block
    return offsets + h % block, (1 - 2 * (h >> 31)).to(torch.int8)


class SparseProjector(_MatrixProjector):
    """The ``sjlt`` projection as a sparse ``(k, numel)`` CSR matrix per parameter, or per group
    of parameters (:meth:`project_many`: their matrices side by side, one product for the group).

    ``Rᵀ vec(g)`` for a whole batch is one sparse-dense matrix product (MKL on CPU, cuSPARSE on
    GPU). Matrices are cached while they fit ``cache_bytes`` (12 bytes per non-zero), else rebuilt
    from the hash on each call; building one costs about as much as one projection. The cache is
    keyed by parameter group.
    """

    def _build(self, params: tuple[tuple[str, tuple[int, ...]], ...]) -> torch.Tensor:
        """``[R_p1ᵀ | R_p2ᵀ | …]``: the parameters' matrices side by side, ``(k, Σ numel)``."""
        spec = self.spec
        rows, columns, offset = [], [], 0
        signs = []
        for name, shape in params:
            outputs, sign = sjlt_coordinates(spec.seed, name, shape, spec.dim, spec.nonzeros, self.device)
            numel = outputs.shape[1]
            rows.append(outputs.flatten())
            columns.append((torch.arange(numel, device=self.device) + offset).expand_as(outputs).flatten())
            signs.append(sign.flatten())
            offset += numel
        values = torch.cat(signs).to(self.dtype) / math.sqrt(spec.nonzeros)
        coo = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(columns)]), values,
                                      (spec.dim, offset), check_invariants=False)
        # Within a block each coordinate has one output, so coalescing sums nothing: exact.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return coo.coalesce().to_sparse_csr()

    def _matrix(self, params: tuple[tuple[str, tuple[int, ...]], ...]) -> torch.Tensor:
        cached = self._cache.get(params)
        if cached is not None:
            return cached
        matrix = self._build(params)
        return self._keep(params, matrix, matrix.values().numel() * 12)

    def _multiply(self, matrix: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(matrix, flat.to(self.dtype).T).T

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        flat = grads.reshape(grads.shape[0], -1)
        return self._multiply(self._matrix(((name, tuple(grads.shape[1:])),)), flat)

    def project_many(self, params: list[tuple[str, tuple[int, ...]]], grads: torch.Tensor) -> torch.Tensor:
        """One sparse product with the parameters' matrices side by side (built and cached once)."""
        key = tuple((name, tuple(shape)) for name, shape in params)
        return self._multiply(self._matrix(key), grads)


def make_projector(spec: ProjectionSpec, device: torch.device | str = "cpu", **kwargs) -> Projector:
    if spec.kind == "sjlt":
        return SparseProjector(spec, device, **kwargs)
    if spec.kind == "rademacher":
        return RademacherProjector(spec, device, **kwargs)
    raise ValueError(f"unknown projection kind {spec.kind!r}")
