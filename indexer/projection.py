"""Random projections of per-example gradients, identical on every device and in every process.

The projection of a (transformed) gradient ``g`` is ``Σ_p R_pᵀ vec(g_p) / sqrt(k)``, summed over the
LoRA parameters ``p``, where ``R_p`` is an ``(numel_p, k)`` Rademacher (±1) matrix. Stacking the
``R_p`` in parameter order gives one dense matrix over the flattened gradient, so this is exactly
the global projection LESS uses; it is simply never materialised as a whole.

Each entry of ``R_p`` is a pure function of ``(seed, parameter name, parameter shape, k)`` and its
row and column, computed with a counter-based integer hash (below) in plain int64 tensor arithmetic
that never overflows. The same bits therefore come out on CPU and on any GPU, in any process, with
any torch version: a service or another machine reproduces the projection from the four values
stored in the datastore manifest. (Projectors driven by a device RNG do not have this property.)

The hash, version ``gradstore-rademacher-v1``, for parameter ``name`` of shape ``S``:

    key       = first 4 bytes (little-endian) of sha256("gradstore-rademacher-v1|{seed}|{name}|{S}|{k}")
    row_h[i]  = mix32((key + i) mod 2**32)
    col_h[j]  = mix32((j * 0x9E3779B9) mod 2**32)
    R[i, j]   = +1 if mix32(row_h[i] XOR col_h[j]) < 2**31 else -1

where ``mix32`` is the "lowbias32" integer finaliser (xor-shift 16, ×0x7feb352d, xor-shift 15,
×0x846ca68b, xor-shift 16, all mod 2**32). ``i`` indexes ``vec(g_p)`` in row-major (C) order.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

HASH_VERSION = "gradstore-rademacher-v1"
PROJECTION_KINDS = ("rademacher",)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
# Rows generated per block are capped so one block of int64 hash state stays near 128 MiB.
_BLOCK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that defines a projection; stored in the datastore manifest."""

    kind: str = "rademacher"
    dim: int = 8192
    seed: int = 0
    version: str = HASH_VERSION

    def __post_init__(self):
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}: expected one of {PROJECTION_KINDS}")
        if self.dim < 1:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.version != HASH_VERSION:
            raise ValueError(f"projection version {self.version!r} is not supported by this gradstore "
                             f"(supported: {HASH_VERSION!r})")

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


def param_key(seed: int, name: str, shape: tuple[int, ...], dim: int) -> int:
    text = f"{HASH_VERSION}|{seed}|{name}|{tuple(int(s) for s in shape)}|{dim}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


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


class RademacherProjector(Projector):
    """Dense Rademacher projection, generated blockwise and cached up to ``cache_bytes``.

    Matrices are generated on ``device`` (the hash is device-independent) and kept for reuse while
    the cache has room; past that, blocks are regenerated on every call, so memory stays bounded
    by one block whatever the model size.
    """

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_bytes: int = 2 << 30):
        super().__init__(spec)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._cached_bytes = 0

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
        if self._cached_bytes + size > self.cache_bytes:
            return None
        matrix = torch.cat([block for _, block in self._blocks(name, shape)])
        self._cache[(name, shape)] = matrix
        self._cached_bytes += size
        return matrix

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


def make_projector(spec: ProjectionSpec, device: torch.device | str = "cpu", **kwargs) -> Projector:
    if spec.kind == "rademacher":
        return RademacherProjector(spec, device, **kwargs)
    raise ValueError(f"unknown projection kind {spec.kind!r}")
