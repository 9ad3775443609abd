"""Default batch limits of an indexing job, by device type.

An indexing job packs the examples of a shard, longest first, into batches of at most
``max_tokens_per_batch`` padded tokens and ``max_batch_size`` examples
(:func:`gradstore.indexer.featurize.length_batches`). A job given neither limit takes its device's
defaults once the device is known (:meth:`gradstore.indexer.job.IndexJobConfig.with_device_batching`),
and records the values it used in the manifest and in its resume fingerprint.

* CPU: few examples per batch. The per-example gradient work of a batch grows with its examples
  while the cores are already busy with a few, so small batches index as fast or faster and peak
  at a fraction of the memory (``bench/batch_defaults.py``; ``bench/RESULTS.md``, "Batch
  defaults").
* CUDA: large batches keep the GPU busy; a batch that does not fit is split and retried (the
  featurizer's out-of-memory handling). These values are reasoned, not measured here.

Any other device type takes the CPU's limits. This module imports nothing heavy, so the command
line's ``--help`` can show the defaults with the base install.
"""

from __future__ import annotations

# device type -> (max_tokens_per_batch, max_batch_size)
DEFAULT_BATCHING: dict[str, tuple[int, int]] = {"cpu": (4096, 8), "cuda": (16384, 64)}


def default_batching(device_type: str) -> tuple[int, int]:
    """``(max_tokens_per_batch, max_batch_size)`` for a job on ``device_type``."""
    return DEFAULT_BATCHING.get(device_type, DEFAULT_BATCHING["cpu"])
