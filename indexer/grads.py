"""Per-example gradients of LoRA parameters for a whole padded batch in one forward/backward pass.

For a linear map ``y = W x`` applied at every token ``t`` of one example, the example's gradient is
``dL/dW = Σ_t (dL/dy_t) x_tᵀ``. PEFT implements LoRA as two plain ``nn.Linear`` maps, ``lora_A`` and
``lora_B``, so capturing each one's input (forward hook) and the gradient of the loss with respect
to its output (``torch.autograd.grad`` on the captured outputs) gives every example's gradient of
every LoRA matrix with one batched matrix product per module — no batch-size-1 loop, no autograd
graph over per-example copies.

Each example's loss is the mean cross-entropy over its own label tokens (what HF computes for that
example alone) and the batch loss is their sum, so examples do not scale each other's gradients.
Padding is on the right. Attention is causal, so no real position attends to a padded one (they
all come after it), and padded positions carry no loss, so their output gradients are exactly zero:
neither padding nor batch composition changes any example's gradient. For the same reason a
right-padded batch needs no padding mask: the model gets an all-ones mask and runs on its causal
attention kernels, faster than masked ones (a batch padded otherwise keeps its mask).

Logits are only computed where they are used: a forward pre-hook on the model's output layer
(``get_output_embeddings()``) passes it the hidden states of the positions that predict a label
token, so prompt and padding positions skip the vocabulary projection and the softmax, forward
and backward. The losses are the same numbers; models whose output layer is adapted by LoRA, or
whose logits do not come straight from that layer, take the full path.

:meth:`PerExampleGradients.compute` also reads, from the same pass, what
:mod:`gradstore.indexer.extras` specifies: the pooled last hidden states (a second pre-hook on the
output layer, ahead of the one that gathers label positions), the gradients with respect to the
input token embeddings (their output replaced by a leaf that requires grad, one more output of the
same ``torch.autograd.grad`` call) and the spectra of each adapted module's weight gradient (from
the inputs and output gradients already captured).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError
from .extras import nuclear_norm_and_effective_rank, position_weighted_mean, singular_values, triangular_factor
from .formatting import IGNORE_INDEX
from .optimizer_state import canonical_param_name


@dataclass
class Batch:
    """Right-padded token ids with labels (-100 where there is no loss)."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64

    @classmethod
    def collate(cls, examples: list[tuple], pad_id: int, device: torch.device | str) -> "Batch":
        """``examples``: ``(input_ids, labels)`` pairs of 1-D integer sequences."""
        length = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.int64)
        for row, (ids, labs) in enumerate(examples):
            n = len(ids)
            input_ids[row, :n] = torch.as_tensor(ids, dtype=torch.int64)
            labels[row, :n] = torch.as_tensor(labs, dtype=torch.int64)
            attention_mask[row, :n] = 1
        return cls(input_ids.to(device), attention_mask.to(device), labels.to(device))


@dataclass(frozen=True)
class LoraPair:
    """The two ``nn.Linear`` halves of one LoRA-adapted module, with canonical parameter names."""

    a: torch.nn.Linear
    b: torch.nn.Linear
    a_name: str
    b_name: str
    scaling: float = 1.0  # PEFT adds scaling * b(a(x)) to the base layer's output


def find_lora_pairs(model: torch.nn.Module, adapter_name: str = "default") -> list[LoraPair]:
    """Every LoRA module of a PEFT model, in ``named_parameters()`` order."""
    pairs = []
    for module_name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter_name not in lora_a:
            continue
        a, b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
            raise ModelError(f"{module_name}: LoRA on {type(a).__name__} layers is not supported "
                             "(only linear and Conv1D target modules are)")
        if a.bias is not None or b.bias is not None:
            raise ModelError(f"{module_name}: LoRA with bias is not supported")
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            raise ModelError(f"{module_name}: DoRA adapters are not supported")
        prefix = f"{module_name}.lora_"
        pairs.append(LoraPair(
            a, b,
            canonical_param_name(f"{prefix}A.{adapter_name}.weight", adapter_name),
            canonical_param_name(f"{prefix}B.{adapter_name}.weight", adapter_name),
            float(module.scaling[adapter_name]),
        ))
    if not pairs:
        raise ModelError(f"the model has no LoRA modules for adapter {adapter_name!r}")
    trainable = {canonical_param_name(n, adapter_name) for n, p in model.named_parameters() if p.requires_grad}
    covered = {name for pair in pairs for name in (pair.a_name, pair.b_name)}
    if trainable != covered:
        extra = sorted(trainable - covered)[:5]
        raise ModelError(f"trainable parameters outside LoRA A/B matrices are not supported: {extra}")
    return pairs


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for ``batch``.

    When the padding is all on the right, causal attention already keeps every real position from
    seeing a padded one, so the mask passed is all ones: the model takes its causal fast path and
    real positions get exactly the values a padding mask would give them. Other padding keeps its
    mask.
    """
    mask = batch.attention_mask
    if mask.shape[1] < 2 or bool((mask[:, 1:] <= mask[:, :-1]).all()):
        mask = torch.ones_like(mask)
    return {"input_ids": batch.input_ids, "attention_mask": mask}


def output_head(model: torch.nn.Module, exclude: list[torch.nn.Module] = ()) -> torch.nn.Module | None:
    """The model's output layer if logits can be computed on selected positions only, else None.

    ``exclude``: modules whose inputs must keep their ``(B, T, ...)`` shape (the LoRA maps).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    excluded = {id(m) for m in exclude}
    if any(id(m) in excluded for m in head.modules()):
        return None
    return head


def label_position_losses(model: torch.nn.Module, batch: Batch, head: torch.nn.Module | None) -> torch.Tensor | None:
    """:func:`per_example_losses` of ``model`` on ``batch``, with logits at label positions only.

    Position ``t`` predicts token ``t + 1``, so only positions whose next label is not
    ``IGNORE_INDEX`` reach ``head``. Returns None (nothing computed worth keeping) when ``head`` is
    None or the model's logits turn out not to be ``head``'s output; the caller then uses the full
    logits. Call with gradients enabled to backpropagate.
    """
    if head is None:
        return None
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if bool((keep.sum(dim=1) == 0).any()):
        raise ValueError("an example in the batch has no label tokens")
    rows, cols = keep.nonzero(as_tuple=True)

    def gather(module, args):
        if not args or tuple(args[0].shape[:2]) != tuple(batch.input_ids.shape):
            return None  # not the (B, T, hidden) call expected: left alone, caught below
        return (args[0][rows, cols], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**model_inputs(batch)).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != rows.shape[0]:
        return None
    token_loss = F.cross_entropy(logits.float(), targets[rows, cols], reduction="none")
    # Scattered back to (B, T - 1) and summed per row: the same sums, in the same order, as the
    # full path's, and deterministic on every device (no atomic adds).
    per_token = torch.zeros(targets.shape, dtype=token_loss.dtype, device=token_loss.device)
    per_token = per_token.index_put((rows, cols), token_loss)
    return per_token.sum(dim=1) / keep.sum(dim=1)


def batch_losses(model: torch.nn.Module, batch: Batch, head: torch.nn.Module | None) -> torch.Tensor:
    """Per-example mean token losses ``(B,)`` of ``model`` on ``batch`` (see :func:`output_head`)."""
    losses = label_position_losses(model, batch, head)
    if losses is None:
        logits = model(**model_inputs(batch)).logits
        losses = per_example_losses(logits, batch.labels)
    return losses


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's own label tokens, shape ``(B,)``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example in the batch has no label tokens")
    return token_loss.sum(dim=1) / counts


@dataclass
class BatchGradients:
    """What :meth:`PerExampleGradients.compute` gives for one batch."""

    losses: torch.Tensor  # (B,) float32
    per_param: Iterator[tuple[str, torch.Tensor]]  # (name, (B, *shape)) lazily, see __call__
    representations: torch.Tensor | None = None  # (B, H) float32, pooled last hidden states
    input_grads: torch.Tensor | None = None  # (B, T, H): dL_i / d(input token embeddings)
    nuclear_norm: torch.Tensor | None = None  # (B,) float32
    effective_rank: torch.Tensor | None = None  # (B,) float32


# Per-example gradients are handed on in groups of consecutive parameters of at most this many
# elements per example (4 MiB in float32), so the transform and the projection run a few large
# operations per batch instead of a dozen small ones per parameter. The grouping depends on the
# parameter shapes only, never on the batch.
GROUP_ELEMENTS = 1 << 20


class PerExampleGradients:
    """Computes per-example gradients of every LoRA matrix of a PEFT model.

    Usage::

        grads = PerExampleGradients(model)
        losses, per_param = grads(batch)      # per_param yields (name, (B, *shape)) lazily
        losses, groups = grads.grouped(batch) # groups yield ([(name, shape), ...], (B, Σ numel))
    """

    def __init__(self, model: torch.nn.Module, adapter_name: str = "default"):
        self.model = model
        self.pairs = find_lora_pairs(model, adapter_name)
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._head = output_head(model, [m for pair in self.pairs for m in (pair.a, pair.b)])

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape of every LoRA matrix, in parameter order."""
        shapes = {}
        for pair in self.pairs:
            shapes[pair.a_name] = tuple(pair.a.weight.shape)
            shapes[pair.b_name] = tuple(pair.b.weight.shape)
        return shapes

    def _capture(self, module, inputs, output):
        self._captured[id(module)] = (inputs[0], output)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Iterator[tuple[str, torch.Tensor]]]:
        """Per-example losses ``(B,)`` and an iterator of ``(name, per-example grads)``.

        The iterator computes each parameter's ``(B, *shape)`` float32 gradients on demand, so only
        one parameter's per-example gradients are alive at a time.
        """
        result = self.compute(batch)
        return result.losses, result.per_param

    def compute(self, batch: Batch, representations: bool = False, input_grads: bool = False,
                spectra: bool = False) -> "BatchGradients":
        """What ``__call__`` gives, and from the same pass (see :mod:`gradstore.indexer.extras`):
        with ``representations`` the position-weighted mean of the last hidden states ``(B, H)``;
        with ``input_grads`` each example's gradient with respect to its input token embeddings
        ``(B, T, H)``; with ``spectra`` the mean over adapted modules of the nuclear norm and
        effective rank of each example's weight gradient ``(B,)``."""
        self.model.eval()  # dropout off: the gradient of the model as it is, as LESS does
        modules = [m for pair in self.pairs for m in (pair.a, pair.b)]
        handles = [m.register_forward_hook(self._capture) for m in modules]
        extra: dict[str, torch.Tensor] = {}
        try:
            if representations:
                handles.append(self._hidden_state_hook(batch, extra))
            if input_grads:
                handles.append(self._input_embedding_hook(extra))
            with torch.enable_grad():
                losses = label_position_losses(self.model, batch, self._head)
                if losses is None:  # the logits are not the output layer's: full logits from now on
                    self._head = None
                    logits = self.model(**model_inputs(batch)).logits
                    losses = per_example_losses(logits, batch.labels)
                outputs = [self._captured[id(m)][1] for m in modules]
                if input_grads:
                    if "embeddings" not in extra:
                        raise ModelError("the model did not call its input embedding layer "
                                         "(get_input_embeddings()); index with --no-vog")
                    outputs.append(extra["embeddings"])
                output_grads = torch.autograd.grad(losses.sum(), outputs)
        finally:
            for handle in handles:
                handle.remove()
        captured = {id(m): (self._captured[id(m)][0].detach(), g) for m, g in zip(modules, output_grads)}
        self._captured.clear()
        result = BatchGradients(losses.detach().float(), self._iter_grads(captured),
                                representations=extra.get("pooled"),
                                input_grads=output_grads[len(modules)] if input_grads else None)
        if spectra:
            result.nuclear_norm, result.effective_rank = self._spectra(captured)
        return result

    def _hidden_state_hook(self, batch: Batch, extra: dict):
        """A pre-hook on the output layer that pools the ``(B, T, H)`` states it receives; registered
        before :func:`label_position_losses` gathers label positions, so it sees all of them."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Module):
            raise ModelError("the model has no output layer (get_output_embeddings()) whose input is the last "
                             "hidden states; index with --no-representations")

        def pool(module, args):
            if args and tuple(args[0].shape[:2]) == tuple(batch.input_ids.shape):
                with torch.no_grad():
                    extra["pooled"] = position_weighted_mean(args[0], batch.attention_mask)

        return head.register_forward_pre_hook(pool)

    def _input_embedding_hook(self, extra: dict):
        """A forward hook that makes the token embeddings a leaf requiring grad (the embedding
        weights are frozen, so nothing else changes), to differentiate the losses by them."""
        embedding = self.model.get_input_embeddings()
        if not isinstance(embedding, torch.nn.Module):
            raise ModelError("the model has no input embedding layer (get_input_embeddings()); index with --no-vog")

        def leaf(module, inputs, output):
            output = output.detach().requires_grad_(True)
            extra["embeddings"] = output
            return output

        return embedding.register_forward_hook(leaf)

    def _spectra(self, captured) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over adapted modules of each example's nuclear norm and effective rank of
        ``Σ_t g_t x_tᵀ``; modules fed the same input tensor (q/k/v) share its factorisation."""
        factors: dict[tuple, torch.Tensor] = {}
        nuclear, rank = 0.0, 0.0
        for pair in self.pairs:
            inputs = captured[id(pair.a)][0]
            key = (inputs.data_ptr(), tuple(inputs.shape), inputs.stride())
            if key not in factors:
                factors[key] = triangular_factor(inputs)
            output_grads = captured[id(pair.b)][1].float() / pair.scaling
            n, r = nuclear_norm_and_effective_rank(singular_values(factors[key], triangular_factor(output_grads)))
            nuclear, rank = nuclear + n, rank + r
        return nuclear / len(self.pairs), rank / len(self.pairs)

    def grouped(self, batch: Batch, max_elements: int = GROUP_ELEMENTS
                ) -> tuple[torch.Tensor, Iterator[tuple[list[tuple[str, tuple[int, ...]]], torch.Tensor]]]:
        """Per-example losses and an iterator of ``(params, flat)``: consecutive parameters
        ``[(name, shape), ...]`` of at most ``max_elements`` elements together (or one larger
        parameter), and their per-example gradients flattened and concatenated in that order,
        ``(B, Σ numel)`` float32."""
        losses, per_param = self(batch)
        return losses, self.group_params(per_param, max_elements)

    @staticmethod
    def group_params(per_param: Iterator[tuple[str, torch.Tensor]], max_elements: int = GROUP_ELEMENTS
                     ) -> Iterator[tuple[list[tuple[str, tuple[int, ...]]], torch.Tensor]]:
        """``per_param`` (as :meth:`__call__` yields it) in the groups of :meth:`grouped`."""
        params, parts, size = [], [], 0
        for name, grads in per_param:
            numel = grads[0].numel()
            if parts and size + numel > max_elements:
                yield params, torch.cat(parts, dim=1)
                params, parts, size = [], [], 0
            params.append((name, tuple(grads.shape[1:])))
            parts.append(grads.reshape(grads.shape[0], numel))
            size += numel
        if parts:
            yield params, torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _iter_grads(self, captured) -> Iterator[tuple[str, torch.Tensor]]:
        for pair in self.pairs:
            for module, name in ((pair.a, pair.a_name), (pair.b, pair.b_name)):
                inputs, output_grad = captured.pop(id(module))
                # (B, T, out)ᵀ @ (B, T, in) -> (B, out, in): Σ_t g_t x_tᵀ for every example at once.
                yield name, torch.bmm(output_grad.float().transpose(1, 2), inputs.float())
