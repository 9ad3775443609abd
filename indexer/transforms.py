"""Gradient transforms applied to per-example LoRA gradients before random projection.

The indexer computes, for every example, the gradient of its LM loss w.r.t. each LoRA parameter,
passes it through one of these transforms, and projects the result:

    sgd    the raw gradient g (LESS uses it for validation / query examples)
    sign   sign(g)
    adam   the bias-corrected AdamW update direction the optimizer would take if g were its next
           gradient, with the betas, eps and step count read from the checkpoint
    less   the Adam-preconditioned gradient exactly as the LESS reference code computes it (fixed
           constants, no bias correction), for results comparable with published LESS numbers

Every transform takes ``grads`` of shape ``(batch, *param_shape)`` and returns the same shape and
dtype; the arithmetic is done in float32 so that bf16 gradients do not lose the small second
moments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from .errors import OptimizerStateError
from .optimizer_state import AdamParamState

GRADIENT_TYPES = ("sgd", "sign", "adam", "less")

# Constants of the LESS reference implementation (collect_grad_reps.obtain_gradients_with_adam).
LESS_BETA1 = 0.9
LESS_BETA2 = 0.999
LESS_EPS = 1e-8


class GradientTransform(ABC):
    """Maps the per-example gradients of one canonical LoRA parameter to what gets projected."""

    name: str
    needs_optimizer_state: bool

    @abstractmethod
    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        """``grads``: ``(batch, *param_shape)`` gradients of ``param``; same shape and dtype out."""


class SGD(GradientTransform):
    """The raw gradient."""

    name = "sgd"
    needs_optimizer_state = False

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        return grads


class Sign(GradientTransform):
    """The sign of the gradient (zero stays zero)."""

    name = "sign"
    needs_optimizer_state = False

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        return torch.sign(grads)


class _AdamFamily(GradientTransform):
    """Shared part of the Adam transforms: the checkpoint moments, moved to the gradients' device.

    The transform is called once per batch and parameter, so each moment is copied to the device
    on first use and kept, instead of being copied again on every call.
    """

    needs_optimizer_state = True

    def __init__(self, states: Mapping[str, AdamParamState]):
        self.states = dict(states)
        self._moments: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _state(self, param: str) -> AdamParamState:
        """The checkpoint state of ``param``; an error naming it when there is none."""
        try:
            return self.states[param]
        except KeyError:
            raise OptimizerStateError(
                f"{self.name} transform: no optimizer state for parameter {param} "
                f"({len(self.states)} parameters have one)"
            ) from None

    def _moments_on(self, param: str, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of ``param`` as float32 on ``grads``' device, shape-checked."""
        key = (param, grads.device)
        if key not in self._moments:
            state = self._state(param)
            self._moments[key] = (
                state.exp_avg.to(device=grads.device, dtype=torch.float32),
                state.exp_avg_sq.to(device=grads.device, dtype=torch.float32),
            )
        exp_avg, exp_avg_sq = self._moments[key]
        if tuple(grads.shape[1:]) != tuple(exp_avg.shape):
            raise OptimizerStateError(
                f"{self.name} transform: {param}: per-example gradients have shape "
                f"{tuple(grads.shape)} (batch first), optimizer state has shape "
                f"{tuple(exp_avg.shape)}"
            )
        return exp_avg, exp_avg_sq


class Adam(_AdamFamily):
    """Bias-corrected AdamW update direction if ``g`` were the optimizer's next gradient.

    m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2;  t = step + 1
    Gamma = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps)

    This is exactly ``-(p_after - p_before) / lr`` of ``torch.optim.AdamW`` without weight decay.
    """

    name = "adam"

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        exp_avg, exp_avg_sq = self._moments_on(param, grads)
        state = self._state(param)
        g = grads.to(torch.float32)
        step = state.step + 1
        m = state.beta1 * exp_avg + (1 - state.beta1) * g
        v = state.beta2 * exp_avg_sq + (1 - state.beta2) * g.square()
        m_hat = m / (1 - state.beta1 ** step)
        v_hat = v / (1 - state.beta2 ** step)
        return (m_hat / (v_hat.sqrt() + state.eps)).to(grads.dtype)


class LessAdam(_AdamFamily):
    """The Adam-preconditioned gradient of the LESS reference code, reproduced as written there.

    m' = 0.9 m + 0.1 g;  v' = 0.999 v + 0.001 g^2;  Gamma = m' / sqrt(v' + 1e-8)

    The constants are fixed on purpose: the reference ignores the checkpoint's betas, eps and
    step (no bias correction, eps inside the square root), and matching it keeps selections
    comparable with LESS. Use ``adam`` for the direction the optimizer would actually take.
    """

    name = "less"

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        exp_avg, exp_avg_sq = self._moments_on(param, grads)
        g = grads.to(torch.float32)
        m = LESS_BETA1 * exp_avg + (1 - LESS_BETA1) * g
        v = LESS_BETA2 * exp_avg_sq + (1 - LESS_BETA2) * g.square()
        return (m / torch.sqrt(v + LESS_EPS)).to(grads.dtype)


def make_transform(kind: str, states: Mapping[str, AdamParamState] | None) -> GradientTransform:
    """The transform called ``kind`` (one of ``GRADIENT_TYPES``); adam / less need ``states``."""
    if kind == "sgd":
        return SGD()
    if kind == "sign":
        return Sign()
    if kind in ("adam", "less"):
        if states is None:
            raise OptimizerStateError(
                f"gradient type {kind!r} needs the checkpoint's Adam optimizer state "
                "(optimizer.pt or optimizer.bin), and none was given"
            )
        return Adam(states) if kind == "adam" else LessAdam(states)
    raise ValueError(f"unknown gradient type {kind!r}: expected one of {', '.join(GRADIENT_TYPES)}")
