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

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

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

    def flat(self, params: Sequence[tuple[str, tuple[int, ...]]], grads: torch.Tensor) -> torch.Tensor:
        """``grads``: ``(batch, Σ numel)``, the per-example gradients of ``params`` (``(name, shape)``
        pairs) flattened and concatenated in order; the transformed gradients, same layout."""
        outs, offset = [], 0
        for name, shape in params:
            numel = math.prod(shape)
            part = grads[:, offset:offset + numel].reshape(grads.shape[0], *shape)
            outs.append(self(name, part).reshape(grads.shape[0], numel))
            offset += numel
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class SGD(GradientTransform):
    """The raw gradient."""

    name = "sgd"
    needs_optimizer_state = False

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def flat(self, params, grads: torch.Tensor) -> torch.Tensor:
        return grads


class Sign(GradientTransform):
    """The sign of the gradient (zero stays zero)."""

    name = "sign"
    needs_optimizer_state = False

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        return torch.sign(grads)

    def flat(self, params, grads: torch.Tensor) -> torch.Tensor:
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
        # (params, device) -> the constants of _apply for those parameters concatenated, or None
        # when their hyper-parameters differ (then each parameter is transformed on its own).
        self._flat: dict[tuple, tuple | None] = {}

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

    @abstractmethod
    def _constants(self, state: AdamParamState, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> tuple:
        """``(m0, alpha_m, v0, alpha_v, eps)`` of ``_apply`` for one parameter's state."""

    @staticmethod
    def _apply(grads: torch.Tensor, m0: torch.Tensor, alpha_m: float, v0: torch.Tensor, alpha_v: float,
               eps: float) -> torch.Tensor:
        """``(m0 + alpha_m g) / (sqrt(v0 + alpha_v g²) + eps)`` in float32, two passes' memory."""
        g = grads.to(torch.float32)
        denominator = torch.addcmul(v0, g, g, value=alpha_v).sqrt_().add_(eps)
        return torch.add(m0, g, alpha=alpha_m).div_(denominator).to(grads.dtype)

    def _hyper(self, param: str) -> tuple:
        return ()

    def __call__(self, param: str, grads: torch.Tensor) -> torch.Tensor:
        exp_avg, exp_avg_sq = self._moments_on(param, grads)
        return self._apply(grads, *self._constants(self._state(param), exp_avg, exp_avg_sq))

    def flat(self, params, grads: torch.Tensor) -> torch.Tensor:
        key = (tuple(params), grads.device)
        if key not in self._flat:
            self._flat[key] = None
            if len({self._hyper(name) for name, _ in params}) == 1:
                moments = [self._moments_on(name, grads.new_empty((0, *shape))) for name, shape in params]
                exp_avg = torch.cat([m.reshape(-1) for m, _ in moments])
                exp_avg_sq = torch.cat([v.reshape(-1) for _, v in moments])
                if exp_avg.numel() != grads.shape[1]:
                    raise OptimizerStateError(f"{self.name} transform: gradients of {len(params)} parameters "
                                              f"have {grads.shape[1]} elements per example, their optimizer "
                                              f"state {exp_avg.numel()}")
                self._flat[key] = self._constants(self._state(params[0][0]), exp_avg, exp_avg_sq)
        constants = self._flat[key]
        if constants is None:
            return super().flat(params, grads)
        return self._apply(grads, *constants)


class Adam(_AdamFamily):
    """Bias-corrected AdamW update direction if ``g`` were the optimizer's next gradient.

    m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2;  t = step + 1
    Gamma = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps)

    This is exactly ``-(p_after - p_before) / lr`` of ``torch.optim.AdamW`` without weight decay.
    """

    name = "adam"

    def _hyper(self, param: str) -> tuple:
        state = self._state(param)
        return state.step, state.beta1, state.beta2, state.eps

    def _constants(self, state, exp_avg, exp_avg_sq) -> tuple:
        # m_hat = (b1 m + (1 - b1) g) / (1 - b1^t), v_hat likewise: bias corrections folded in.
        step = state.step + 1
        c1, c2 = 1 / (1 - state.beta1 ** step), 1 / (1 - state.beta2 ** step)
        return (exp_avg * (state.beta1 * c1), (1 - state.beta1) * c1,
                exp_avg_sq * (state.beta2 * c2), (1 - state.beta2) * c2, state.eps)


class LessAdam(_AdamFamily):
    """The Adam-preconditioned gradient of the LESS reference code, reproduced as written there.

    m' = 0.9 m + 0.1 g;  v' = 0.999 v + 0.001 g^2;  Gamma = m' / sqrt(v' + 1e-8)

    The constants are fixed on purpose: the reference ignores the checkpoint's betas, eps and
    step (no bias correction, eps inside the square root), and matching it keeps selections
    comparable with LESS. Use ``adam`` for the direction the optimizer would actually take.
    """

    name = "less"

    def _constants(self, state, exp_avg, exp_avg_sq) -> tuple:
        # m' / sqrt(v' + eps): the eps goes inside the square root, so into v0, and none outside.
        return (exp_avg * LESS_BETA1, 1 - LESS_BETA1, exp_avg_sq * LESS_BETA2 + LESS_EPS, 1 - LESS_BETA2, 0.0)


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
