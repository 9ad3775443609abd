"""Small point sets for the geometric selection tests, and a FeatureSpace over an array."""

from __future__ import annotations

import numpy as np

from gradstore.selection.feature_space import FeatureSpace


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(counts, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around mutually orthogonal centres, ``counts[c]`` of cluster ``c``; and the
    cluster of each."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:len(counts)]
    labels = np.repeat(np.arange(len(counts)), counts)
    points = centres[labels] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return unit(points), labels


def array_space(points: np.ndarray, targets: np.ndarray | None = None) -> FeatureSpace:
    points = np.asarray(points, dtype=np.float32)
    return FeatureSpace("gradients", points.shape[1], lambda rows: points[np.asarray(rows)], targets)
