"""The projection: a pure function of (seed, name, shape, k), and faithful to exact cosines."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradstore.indexer.projection import (
    ProjectionSpec,
    RademacherProjector,
    SparseProjector,
    make_projector,
    rademacher_block,
    sjlt_coordinates,
)


def mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def key_of(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def reference_entry(seed, name, shape, dim, i, j):
    """The documented dense hash, in plain Python integers (module docstring of projection.py)."""
    key = key_of(f"gradstore-rademacher-v1|{seed}|{name}|{tuple(shape)}|{dim}")
    row_h = mix32((key + i) & 0xFFFFFFFF)
    col_h = mix32((j * 0x9E3779B9) & 0xFFFFFFFF)
    return 1 if mix32(row_h ^ col_h) < 2**31 else -1


def reference_sjlt(seed, name, shape, dim, nonzeros, i, j):
    """Output index and sign of non-zero ``j`` of coordinate ``i``, as documented."""
    key = key_of(f"gradstore-sjlt-v1|{seed}|{name}|{tuple(shape)}|{dim}|{nonzeros}")
    h = mix32(mix32((key + i) & 0xFFFFFFFF) ^ mix32((j * 0x9E3779B9) & 0xFFFFFFFF))
    block = dim // nonzeros
    return j * block + h % block, 1 if h < 2**31 else -1


def test_sjlt_follows_the_documented_hash():
    shape, dim, nonzeros = (8, 16), 96, 3
    outputs, signs = sjlt_coordinates(7, "layer.lora_B.weight", shape, dim, nonzeros)
    for i in range(0, 128, 9):
        for j in range(nonzeros):
            assert (outputs[j, i].item(), signs[j, i].item()) == reference_sjlt(
                7, "layer.lora_B.weight", shape, dim, nonzeros, i, j)


def test_sjlt_projection_is_the_documented_sparse_matrix():
    spec = ProjectionSpec(kind="sjlt", dim=256, seed=4, nonzeros=4)
    grads = torch.randn(3, 10, 6)
    outputs, signs = sjlt_coordinates(4, "w", (10, 6), 256, 4)
    dense = torch.zeros(60, 256)
    for j in range(4):
        dense[torch.arange(60), outputs[j]] += signs[j].float() / 2
    assert torch.count_nonzero(dense) == 240  # s distinct outputs per coordinate, one per block
    expected = grads.reshape(3, -1) @ dense
    torch.testing.assert_close(SparseProjector(spec).project("w", grads), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(SparseProjector(spec, cache_bytes=0).project("w", grads), expected,
                               rtol=1e-5, atol=1e-6)


def test_spec_defaults_and_validation():
    spec = ProjectionSpec()
    assert (spec.kind, spec.dim, spec.nonzeros, spec.version) == ("sjlt", 8192, 4, "gradstore-sjlt-v1")
    assert ProjectionSpec.from_dict(spec.to_dict()) == spec
    old = ProjectionSpec.from_dict({"kind": "rademacher", "dim": 64, "seed": 0, "version": "gradstore-rademacher-v1"})
    assert old.nonzeros is None
    with pytest.raises(ValueError, match="divides"):
        ProjectionSpec(dim=100, nonzeros=3)
    with pytest.raises(ValueError, match="not supported"):
        ProjectionSpec(kind="sjlt", version="gradstore-sjlt-v0")


def test_matrix_follows_the_documented_hash():
    shape, dim = (8, 16), 64
    block = rademacher_block(7, "layer.lora_A.weight", shape, dim, range(100, 128))
    for i in range(100, 128, 5):
        for j in range(0, dim, 7):
            assert block[i - 100, j].item() == reference_entry(7, "layer.lora_A.weight", shape, dim, i, j)


def test_matrix_depends_on_each_input():
    base = rademacher_block(0, "p", (4, 4), 256, range(16))
    assert set(base.unique().tolist()) == {-1, 1}
    for other in (rademacher_block(1, "p", (4, 4), 256, range(16)),
                  rademacher_block(0, "q", (4, 4), 256, range(16)),
                  rademacher_block(0, "p", (2, 8), 256, range(16))):
        agreement = (other == base).float().mean().item()
        assert 0.4 < agreement < 0.6  # independent signs agree half of the time


def test_blocks_tile_the_matrix():
    whole = rademacher_block(3, "p", (40, 10), 128, range(400))
    parts = torch.cat([rademacher_block(3, "p", (40, 10), 128, range(a, min(a + 77, 400)))
                       for a in range(0, 400, 77)])
    assert torch.equal(whole, parts)


SUBPROCESS = """
import sys, torch
from gradstore.indexer.projection import rademacher_block, sjlt_coordinates
name = "model.layers.0.self_attn.q_proj.lora_B.weight"
block = rademacher_block(11, name, (64, 8), 1024, range(512))
outputs, signs = sjlt_coordinates(11, name, (64, 8), 1024, 4)
sys.stdout.buffer.write(block.numpy().tobytes() + outputs.numpy().tobytes() + signs.numpy().tobytes())
"""


def test_identical_across_processes():
    outputs = [subprocess.run([sys.executable, "-c", SUBPROCESS], capture_output=True, check=True).stdout
               for _ in range(2)]
    name = "model.layers.0.self_attn.q_proj.lora_B.weight"
    here = rademacher_block(11, name, (64, 8), 1024, range(512))
    coords, signs = sjlt_coordinates(11, name, (64, 8), 1024, 4)
    assert outputs[0] == outputs[1] == here.numpy().tobytes() + coords.numpy().tobytes() + signs.numpy().tobytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_identical_on_cpu_and_cuda():
    args = (5, "transformer.h.1.attn.c_attn.lora_A.weight", (8, 64), 8192, range(512))
    cpu = rademacher_block(*args, device="cpu")
    cuda = rademacher_block(*args, device="cuda").cpu()
    assert torch.equal(cpu, cuda)
    for on_cpu, on_cuda in zip(sjlt_coordinates(*args[:4], 4, device="cpu"),
                               sjlt_coordinates(*args[:4], 4, device="cuda")):
        assert torch.equal(on_cpu, on_cuda.cpu())
    grads = torch.randn(3, 8, 64)
    for kind in ("rademacher", "sjlt"):
        spec = ProjectionSpec(kind=kind, dim=8192, seed=5)
        on_cpu = make_projector(spec, "cpu").project(args[1], grads)
        on_cuda = make_projector(spec, "cuda").project(args[1], grads.cuda()).cpu()
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


def test_cached_and_streamed_projection_agree():
    spec = ProjectionSpec(dim=512, seed=2)
    grads = torch.randn(5, 33, 17)
    cached = RademacherProjector(spec).project("w", grads)
    streamed = RademacherProjector(spec, cache_bytes=0).project("w", grads)
    torch.testing.assert_close(cached, streamed, rtol=1e-5, atol=1e-5)
    dense = grads.reshape(5, -1) @ rademacher_block(2, "w", (33, 17), 512, range(33 * 17)).float() / 512**0.5
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projected_cosines_track_exact_cosines_of_real_gradients(tiny_model_dirs, tiny_tokenizer, kind):
    """Per-example gradients of a tiny Llama: Pearson(projected cos, exact cos) >= 0.97 at k=8192."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gradstore.indexer.grads import Batch, PerExampleGradients

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    # Examples built from a few shared "templates" so that true cosines spread widely.
    templates = [torch.randint(3, len(tiny_tokenizer), (20,), generator=gen) for _ in range(4)]
    examples = []
    for n in range(40):
        ids = templates[n % 4].clone()
        ids[torch.randint(0, 20, (4,), generator=gen)] = torch.randint(3, len(tiny_tokenizer), (4,), generator=gen)
        examples.append((ids.tolist(), ids.tolist()))
    spec = ProjectionSpec(kind=kind, dim=8192, seed=0)
    projector = make_projector(spec)
    _, per_param = PerExampleGradients(model)(Batch.collate(examples, pad_id=0, device="cpu"))
    full, projected = [], torch.zeros(len(examples), spec.dim)
    for name, grads in per_param:
        full.append(grads.reshape(len(examples), -1))
        projected += projector.project(name, grads)
    full = torch.nn.functional.normalize(torch.cat(full, dim=1), dim=1)
    projected = torch.nn.functional.normalize(projected, dim=1)
    upper = torch.triu_indices(len(examples), len(examples), offset=1)
    exact = (full @ full.T)[upper[0], upper[1]].numpy()
    approx = (projected @ projected.T)[upper[0], upper[1]].numpy()
    assert exact.std() > 0.1  # a meaningful spread of true similarities
    pearson = np.corrcoef(exact, approx)[0, 1]
    assert pearson >= 0.97, pearson
    # The error matches JL theory: std ≈ sqrt((1 + cos²) / k) (within a factor of 1.5).
    predicted = np.sqrt((1 + exact**2) / spec.dim).mean()
    assert np.std(approx - exact) < 1.5 * predicted


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projecting_a_group_of_parameters_sums_their_projections(kind):
    spec = ProjectionSpec(kind=kind, dim=256, seed=3)
    params = [("a", (4, 6)), ("b", (6, 4)), ("c", (5,))]
    grads = [torch.randn(3, *shape) for _, shape in params]
    projector = make_projector(spec)
    expected = sum(projector.project(name, g) for (name, _), g in zip(params, grads))
    flat = torch.cat([g.reshape(3, -1) for g in grads], dim=1)
    torch.testing.assert_close(projector.project_many(params, flat), expected, rtol=1e-5, atol=1e-5)
    uncached = make_projector(spec, cache_bytes=0).project_many(params, flat)
    torch.testing.assert_close(uncached, expected, rtol=1e-5, atol=1e-5)
