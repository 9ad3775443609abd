"""Per-example features besides the projected gradient, computed in the same pass over the corpus.

Three kinds, each on by default and each stored only when asked for (:class:`ExtraFeatures`):

Representation vector (RDS+, arXiv 2503.01807)
    The position-weighted mean of the model's last hidden states (what the output layer receives)
    over the example's ``T`` non-padding tokens, prompt and answer alike: token ``t`` (1-based) has
    weight ``t / Σ_{j=1..T} j = 2t / (T (T + 1))``, so later tokens count more (SGPT's weighted mean
    pooling, arXiv 2202.08904, as RDS+ uses it), then divided by its L2 norm. The model is the one
    of the store's *first* checkpoint (its adapter switched in; for a fresh LoRA, whose B matrices
    are zero, that is the base model), in the job's dtype. Target records are featurised the same
    way. Computed from the hidden states a forward pre-hook on the output layer sees during that
    checkpoint's gradient pass, so it costs one weighted sum.

Gradient spectra (arXiv 2504.10766)
    For every LoRA-adapted module ``y = W x`` (``W`` of shape out × in, the base layer's weight as a
    linear map; GPT-2's fused ``c_attn`` is one matrix), the example's gradient of its loss (the
    mean over its label tokens) with respect to ``W`` is ``G = Σ_t g_t x_tᵀ``, ``g_t = ∂L/∂y_t``
    the gradient at the module's output and ``x_t`` its input at token ``t``. PEFT adds
    ``scaling · lora_B(lora_A(x))`` to the base output, so ``g_t`` is the gradient at ``lora_B``'s
    output divided by ``scaling``. With singular values ``σ_j`` of ``G``: nuclear norm
    ``N = Σ_j σ_j`` and effective rank ``R = exp(-Σ_j p_j ln p_j)``, ``p_j = σ_j / N`` (``0 ln 0 =
    0``; a zero gradient has ``N = R = 0``). Per example and checkpoint the store keeps the
    **mean over the adapted matrices** (every adapted module of every layer, equally weighted) of
    ``N`` and of ``R``. ``G`` has rank at most ``T`` and is never formed: with ``X`` (``T × in``,
    rows ``x_t``) and ``Γ`` (``T × out``, rows ``g_t``), ``G = Γᵀ X``; the QR factorisations
    ``Xᵀ = Q_x R_x`` and ``Γᵀ = Q_g R_g`` give the factors of the ``T × T`` Gram matrices
    (``R_xᵀ R_x = X Xᵀ``, ``R_gᵀ R_g = Γ Γᵀ``) without squaring their condition numbers, and
    ``G = Q_g (R_g R_xᵀ) Q_xᵀ`` has the singular values of the small ``R_g R_xᵀ`` (at most
    ``T × T``). Padded positions have ``g_t = 0`` and drop out.

VoG, variance of gradients (arXiv 2311.16298)
    At each of the store's ``K`` checkpoints, ``S_k`` is the gradient of the example's loss (the
    same mean over label tokens) with respect to its input token embeddings (the output of the
    model's token-embedding layer, ``T × hidden`` entries). VoG is the mean over those ``T ·
    hidden`` entries of the population standard deviation across checkpoints,
    ``sqrt((1/K) Σ_k (S_k − μ)²)`` with ``μ = (1/K) Σ_k S_k``; no per-class normalisation (a
    language model has no classes). It needs ``K ≥ 2``: a store with one checkpoint has no VoG.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ExtraFeatures:
    """Which extra per-example features a job computes (``gradstore index --no-…`` turns each off)."""

    representations: bool = True
    gradient_spectra: bool = True
    vog: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def position_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float32 weights ``t / Σ_{j=1..T_i} j`` at the first ``T_i`` (real) positions of each
    row, 0 at padding; every row sums to 1."""
    mask = attention_mask.to(torch.float32)
    positions = torch.cumsum(mask, dim=1) * mask  # 1..T_i at real tokens, 0 at padding
    lengths = mask.sum(dim=1, keepdim=True)
    return positions / (lengths * (lengths + 1) / 2).clamp_min(1.0)


def position_weighted_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` hidden states -> ``(B, H)`` float32 SGPT weighted means (not normalised)."""
    weights = position_weights(attention_mask).to(hidden.device)
    return torch.einsum("bt,bth->bh", weights, hidden.detach().float())


def l2_normalized(vectors: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (a zero row stays zero)."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny)


def triangular_factor(columns: torch.Tensor) -> torch.Tensor:
    """``R`` of the QR factorisation of ``columnsᵀ`` per example: ``(B, T, n)`` -> ``(B, min(n, T), T)``,
    with ``Rᵀ R = columns columnsᵀ`` (the ``T × T`` Gram matrix)."""
    return torch.linalg.qr(columns.float().transpose(1, 2), mode="r")[1]


def singular_values(input_factor: torch.Tensor, output_factor: torch.Tensor) -> torch.Tensor:
    """Singular values ``(B, r)`` of every example's ``Σ_t g_t x_tᵀ`` from the triangular factors of
    its inputs ``x`` and output gradients ``g`` (:func:`triangular_factor`)."""
    return torch.linalg.svdvals(torch.bmm(output_factor, input_factor.transpose(1, 2)))


def nuclear_norm_and_effective_rank(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, R)`` per row of singular values ``(B, r)``: ``N = Σσ``, ``R = exp(−Σ p ln p)``,
    ``p = σ / N``; both 0 for an all-zero row."""
    sigma = sigma.double()
    nuclear = sigma.sum(dim=1)
    p = sigma / nuclear.clamp_min(torch.finfo(sigma.dtype).tiny)[:, None]
    rank = torch.exp(-torch.special.xlogy(p, p).sum(dim=1))
    return nuclear.float(), torch.where(nuclear > 0, rank, torch.zeros_like(rank)).float()


class GradientVariance:
    """Welford's running mean and sum of squared deviations of per-example input gradients across
    checkpoints; :meth:`vog` is the VoG of each example (see the module docstring)."""

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, grads: torch.Tensor) -> None:
        """One checkpoint's ``(B, T, H)`` gradients (same batch every time)."""
        grads = grads.detach().float()
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = grads.clone(), torch.zeros_like(grads)
            return
        delta = grads - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (grads - self.mean)

    def vog(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32: mean over each example's real tokens and hidden dims of the population
        standard deviation across the checkpoints added."""
        mask = attention_mask.to(self.m2.device, torch.float32)
        std = torch.sqrt(self.m2.clamp_min(0) / self.count)
        entries = mask.sum(dim=1) * std.shape[2]
        return (std.sum(dim=2) * mask).sum(dim=1) / entries.clamp_min(1.0)
