"""Gradient transforms: hand-computed values, and agreement with a real torch AdamW step."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gradstore.indexer.errors import OptimizerStateError
from gradstore.indexer.optimizer_state import AdamParamState, load_optimizer_state
from gradstore.indexer.transforms import (
    GRADIENT_TYPES,
    Adam,
    LessAdam,
    SGD,
    Sign,
    make_transform,
)

PARAM = "model.layers.0.self_attn.q_proj.lora_A.weight"


def random_state(shape, *, step=5, beta1=0.8, beta2=0.95, eps=1e-3, seed=0) -> AdamParamState:
    """A plausible Adam state with deliberately non-default hyper-parameters."""
    generator = torch.Generator().manual_seed(seed)
    return AdamParamState(
        exp_avg=torch.randn(shape, generator=generator) * 0.1,
        exp_avg_sq=torch.rand(shape, generator=generator) * 0.01,
        step=step, beta1=beta1, beta2=beta2, eps=eps,
    )


def random_grads(batch, shape, seed=1) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------------------------
# Hand computations, element by element in float64
# --------------------------------------------------------------------------------------------


def adam_by_hand(state: AdamParamState, grads: torch.Tensor) -> np.ndarray:
    m = state.exp_avg.double().numpy().ravel()
    v = state.exp_avg_sq.double().numpy().ravel()
    g = grads.double().numpy().reshape(grads.shape[0], -1)
    t = state.step + 1
    out = np.empty_like(g)
    for b in range(g.shape[0]):
        for i in range(g.shape[1]):
            m_next = state.beta1 * m[i] + (1 - state.beta1) * g[b, i]
            v_next = state.beta2 * v[i] + (1 - state.beta2) * g[b, i] ** 2
            m_hat = m_next / (1 - state.beta1 ** t)
            v_hat = v_next / (1 - state.beta2 ** t)
            out[b, i] = m_hat / (math.sqrt(v_hat) + state.eps)
    return out.reshape(grads.shape)


def less_by_hand(state: AdamParamState, grads: torch.Tensor) -> np.ndarray:
    m = state.exp_avg.double().numpy().ravel()
    v = state.exp_avg_sq.double().numpy().ravel()
    g = grads.double().numpy().reshape(grads.shape[0], -1)
    out = np.empty_like(g)
    for b in range(g.shape[0]):
        for i in range(g.shape[1]):
            m_next = 0.9 * m[i] + 0.1 * g[b, i]
            v_next = 0.999 * v[i] + 0.001 * g[b, i] ** 2
            out[b, i] = m_next / math.sqrt(v_next + 1e-8)
    return out.reshape(grads.shape)


def test_sgd_is_the_gradient_and_sign_its_sign():
    grads = torch.tensor([[[0.5, -2.0, 0.0]], [[-0.1, 0.0, 3.0]]])
    assert torch.equal(SGD()(PARAM, grads), grads)
    assert torch.equal(Sign()(PARAM, grads), torch.tensor([[[1.0, -1.0, 0.0]], [[-1.0, 0.0, 1.0]]]))
    assert not SGD().needs_optimizer_state and not Sign().needs_optimizer_state


def test_adam_matches_hand_computation_with_state_hyperparameters():
    state = random_state((3, 4), step=5, beta1=0.8, beta2=0.95, eps=1e-3)
    grads = random_grads(2, (3, 4))

    result = Adam({PARAM: state})(PARAM, grads)

    assert result.shape == grads.shape and result.dtype == grads.dtype
    np.testing.assert_allclose(result.double().numpy(), adam_by_hand(state, grads), rtol=1e-5,
                               atol=1e-6)


def test_adam_depends_on_step_count():
    early, late = random_state((3, 4), step=0), random_state((3, 4), step=1000)
    grads = random_grads(1, (3, 4))
    assert not torch.allclose(Adam({PARAM: early})(PARAM, grads), Adam({PARAM: late})(PARAM, grads))


def test_less_matches_reference_formula_and_ignores_state_hyperparameters():
    state = random_state((3, 4), step=7, beta1=0.5, beta2=0.5, eps=0.1)
    grads = random_grads(3, (3, 4))

    result = LessAdam({PARAM: state})(PARAM, grads)

    assert result.shape == grads.shape and result.dtype == grads.dtype
    np.testing.assert_allclose(result.double().numpy(), less_by_hand(state, grads), rtol=1e-5,
                               atol=1e-6)


def test_bf16_gradients_come_back_bf16_computed_in_float32():
    state = random_state((2, 8))
    grads = random_grads(2, (2, 8)).to(torch.bfloat16)
    for transform in (Adam({PARAM: state}), LessAdam({PARAM: state}), Sign(), SGD()):
        result = transform(PARAM, grads)
        assert result.dtype == torch.bfloat16 and result.shape == grads.shape
    expected = torch.from_numpy(adam_by_hand(state, grads.float())).to(torch.bfloat16)
    torch.testing.assert_close(Adam({PARAM: state})(PARAM, grads), expected)


# --------------------------------------------------------------------------------------------
# Agreement with torch.optim.AdamW
# --------------------------------------------------------------------------------------------


def adamw_with_history(shape, betas=(0.8, 0.95), eps=1e-6, steps=3):
    """A parameter and an AdamW (no weight decay) that has taken ``steps`` real steps."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape))
    optimizer = torch.optim.AdamW([param], lr=0.1, betas=betas, eps=eps, weight_decay=0.0)
    for _ in range(steps):
        param.grad = torch.randn(shape) * 0.05
        optimizer.step()
    return param, optimizer


def next_adamw_step(param, optimizer, grad: torch.Tensor) -> torch.Tensor:
    """``p_before - p_after`` of one AdamW step with lr=1 on ``grad``, on copies."""
    param, optimizer = copy.deepcopy((param, optimizer))
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()
    return before - param.detach()


def state_of(param, optimizer) -> AdamParamState:
    saved = optimizer.state[param]
    group = optimizer.param_groups[0]
    return AdamParamState(exp_avg=saved["exp_avg"].clone(), exp_avg_sq=saved["exp_avg_sq"].clone(),
                          step=int(saved["step"]), beta1=group["betas"][0],
                          beta2=group["betas"][1], eps=group["eps"])


def test_adam_equals_the_next_adamw_update_direction():
    param, optimizer = adamw_with_history((5, 3))
    grads = random_grads(4, (5, 3))

    result = Adam({PARAM: state_of(param, optimizer)})(PARAM, grads)

    for b in range(grads.shape[0]):
        torch.testing.assert_close(result[b], next_adamw_step(param, optimizer, grads[b]),
                                   rtol=1e-5, atol=1e-5)


def test_adam_from_saved_optimizer_file_equals_next_adamw_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 4)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.85, 0.99), weight_decay=0.0)
    for _ in range(3):
        model["proj"](torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    shapes = OrderedDict((name, p.shape) for name, p in model.named_parameters())

    transform = make_transform("adam", load_optimizer_state(tmp_path / "optimizer.pt", shapes))

    for name, param in model.named_parameters():
        grad = torch.randn(param.shape) * 0.1
        expected = next_adamw_step(param, optimizer, grad)
        torch.testing.assert_close(transform(name, grad[None])[0], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Device caching and errors
# --------------------------------------------------------------------------------------------


def test_moments_are_moved_once_and_reused():
    transform = Adam({PARAM: random_state((3, 4))})
    first = transform(PARAM, random_grads(2, (3, 4), seed=1))
    cached = transform._moments[(PARAM, torch.device("cpu"))]
    transform(PARAM, random_grads(2, (3, 4), seed=2))
    assert transform._moments[(PARAM, torch.device("cpu"))] is cached
    assert first.shape == (2, 3, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradients_with_cpu_states():
    state = random_state((16, 8))
    grads = random_grads(3, (16, 8))
    for transform in (Adam({PARAM: state}), LessAdam({PARAM: state})):
        on_gpu = transform(PARAM, grads.cuda())
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), transform(PARAM, grads), rtol=1e-5, atol=1e-6)
        assert state.exp_avg.device.type == "cpu"


def test_make_transform_kinds_and_errors():
    states = {PARAM: random_state((2, 2))}
    assert [type(make_transform(kind, states)) for kind in GRADIENT_TYPES] == \
        [SGD, Sign, Adam, LessAdam]
    assert make_transform("sgd", None).name == "sgd"
    assert make_transform("adam", states).needs_optimizer_state
    for kind in ("adam", "less"):
        with pytest.raises(OptimizerStateError, match=f"gradient type '{kind}' needs"):
            make_transform(kind, None)
    with pytest.raises(ValueError, match="unknown gradient type 'adamw': expected one of "
                                         "sgd, sign, adam, less"):
        make_transform("adamw", states)


def test_unknown_param_and_shape_mismatch_are_named():
    transform = make_transform("less", {PARAM: random_state((2, 2))})
    with pytest.raises(OptimizerStateError, match="no optimizer state for parameter other.weight"):
        transform("other.weight", torch.zeros(1, 2, 2))
    with pytest.raises(OptimizerStateError,
                       match=rf"{PARAM}: per-example gradients have shape \(1, 2, 3\).*"
                             r"optimizer state has shape \(2, 2\)"):
        transform(PARAM, torch.zeros(1, 2, 3))


@pytest.mark.parametrize("kind", ["sgd", "sign", "adam", "less"])
def test_flat_transform_of_a_parameter_group_equals_each_parameter_on_its_own(kind):
    shapes = {"p.lora_A.weight": (3, 4), "p.lora_B.weight": (5, 3)}
    states = {name: random_state(shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    transform = make_transform(kind, states)
    grads = {name: random_grads(2, shape, seed=i + 5) for i, (name, shape) in enumerate(shapes.items())}
    params = list(shapes.items())
    flat = torch.cat([grads[name].reshape(2, -1) for name, _ in params], dim=1)
    expected = torch.cat([transform(name, grads[name]).reshape(2, -1) for name, _ in params], dim=1)
    torch.testing.assert_close(transform.flat(params, flat), expected, rtol=1e-6, atol=1e-6)


def test_flat_adam_with_different_hyperparameters_per_parameter():
    shapes = {"p.lora_A.weight": (3, 4), "p.lora_B.weight": (5, 3)}
    states = {"p.lora_A.weight": random_state((3, 4), step=2), "p.lora_B.weight": random_state((5, 3), step=9)}
    transform = Adam(states)
    params = list(shapes.items())
    flat = random_grads(2, (27,))
    out = transform.flat(params, flat)
    torch.testing.assert_close(out[:, :12].reshape(2, 3, 4), transform("p.lora_A.weight", flat[:, :12].reshape(2, 3, 4)))
    torch.testing.assert_close(out[:, 12:].reshape(2, 5, 3), transform("p.lora_B.weight", flat[:, 12:].reshape(2, 5, 3)))
    np.testing.assert_allclose(out[:, 12:].reshape(2, 5, 3).double().numpy(),
                               adam_by_hand(states["p.lora_B.weight"], flat[:, 12:].reshape(2, 5, 3)), rtol=1e-5, atol=1e-6)
