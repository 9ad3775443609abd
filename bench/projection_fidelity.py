"""Projection fidelity: projected cosine vs exact full-gradient cosine, gradstore vs dense Gaussian.

Real per-example LoRA gradients of a tiny model: a generated multi-task chat corpus
(``demo_corpus.generate_corpus``) tokenised with the indexer's ``Formatter`` (loss on assistant
tokens), a byte-level BPE tokenizer and a tiny Llama-style model built locally
(``indexer.tiny``) and pretrained briefly on the rendered corpus, and a PEFT LoRA (r = 8 on the four
attention projections) trained for a few steps, as a LESS warmup leaves it, so that B != 0 and
neither half of the gradient is zero.
``indexer.grads.PerExampleGradients`` gives every example's gradient of every LoRA matrix
(plain ``sgd`` gradients).

Every pair of examples is then compared three ways at each k:

* exact: the cosine of the two full, flattened gradients (float64);
* gradstore: the projector of each ``--kind`` (by default both ``sjlt``, the indexer's default,
  and the dense ``rademacher``, on the same gradients) applied per parameter and summed, as the
  indexer does, then L2-normalised (the stored feature) — projected cosine = dot product;
* Gaussian: one dense ``torch.randn(D, k) / sqrt(k)`` matrix over the flattened gradient, then
  normalised the same way.

Errors are ``projected - exact`` over all pairs and several projection seeds, pooled (``--seeds``
for gradstore; ``--gaussian-seeds`` for the Gaussian, whose per-seed spread shows how much the
measured std itself varies from one projection draw to another). Two
error kinds are reported: ``cos`` (cosine of the projected vectors: what gradstore stores and
scores), and ``ip`` (the projected inner product of the unit-normalised gradients, no
renormalisation). The theoretical standard deviation for a Gaussian projection is
sqrt((1 + cos²) / k) for ``ip`` and (1 - cos²) / sqrt(k) for ``cos`` (to first order); both are given
as the root mean square over the pairs.

Target: gradstore's ``cos`` error std within 10 % of the dense Gaussian's, at every k (checked
for each kind measured).

    python bench/projection_fidelity.py
    python bench/projection_fidelity.py --examples 200 --dims 1024,4096 --json fidelity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from measure import machine_info


# ------------------------------------------------------------------------------- gradients


def train(model, tokenizer, texts: list[str], steps: int, seed: int, lr: float) -> float:
    """A short causal-LM training of the trainable parameters on ``texts``; returns the last loss."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 32), return_tensors="pt", padding=True, truncation=True, max_length=96)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def real_gradients(args, workdir: Path) -> tuple[list[str], list[tuple[int, ...]], torch.Tensor, dict]:
    """Per-example LoRA gradients ``(n, D)`` float32 in parameter order, with the names and shapes."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()

    from gradstore.indexer.corpus import Record
    from gradstore.indexer.demo_corpus import generate_corpus
    from gradstore.indexer.formatting import Formatter
    from gradstore.indexer.grads import Batch, PerExampleGradients
    from gradstore.indexer.tiny import build_model, build_tokenizer

    corpus = generate_corpus(num_examples=max(2000, args.examples), seed=args.seed)
    texts = [" ".join(m["content"] for m in r["messages"]) for r in corpus]
    tokenizer = build_tokenizer(texts, vocab_size=768)
    model_dir = build_model("llama", tokenizer, workdir / "model", seed=args.seed, hidden=args.hidden,
                            layers=args.layers, heads=4, max_positions=256)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Every record rendered in the chat format the indexer scores (the tulu format, via the
    # indexer's Formatter); the model is trained on these texts, and the first `examples` of them
    # are the examples whose gradients are compared.
    formatter = Formatter(tokenizer, max_length=128)
    encoded_all = [formatter.encode(Record(r["id"], "corpus", f"corpus:{i}", r, "messages"))
                   for i, r in enumerate(corpus)]
    chat_texts = [tokenizer.decode(e.input_ids.tolist()) for e in encoded_all]
    start = time.perf_counter()
    final_loss = train(model, tokenizer, chat_texts, args.pretrain_steps, args.seed, lr=3e-3)
    pretrain_s = time.perf_counter() - start
    model.requires_grad_(False)

    # A LoRA as LESS's warmup leaves it: PEFT's initialisation (B = 0), then a few training steps,
    # so that B != 0 and both halves of every LoRA gradient are non-zero.
    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                        target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # a transformers deprecation PEFT triggers; not ours to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    start = time.perf_counter()
    lora_loss = train(peft_model, tokenizer, chat_texts, args.lora_steps, args.seed + 1, lr=args.lora_lr)
    lora_s = time.perf_counter() - start
    peft_model.eval()
    b_norm = math.sqrt(sum(float(p.detach().square().sum()) for n, p in peft_model.named_parameters()
                           if "lora_B" in n))
    grads = PerExampleGradients(peft_model)
    names = list(grads.param_shapes)
    shapes = list(grads.param_shapes.values())

    records = corpus[:args.examples]
    encoded = encoded_all[:args.examples]
    pad_id = tokenizer.pad_token_id
    dim = sum(math.prod(s) for s in shapes)
    flat = torch.empty(len(encoded), dim, dtype=torch.float32)
    losses = []
    start = time.perf_counter()
    for first in range(0, len(encoded), 32):
        chunk = encoded[first:first + 32]
        batch = Batch.collate([(e.input_ids, e.labels) for e in chunk], pad_id, "cpu")
        loss, per_param = grads(batch)
        losses.append(loss)
        offset = 0
        for name, g in per_param:
            size = g[0].numel()
            flat[first:first + len(chunk), offset:offset + size] = g.reshape(len(chunk), -1)
            offset += size
    grads_s = time.perf_counter() - start
    b_share = float(sum(flat[:, o:o + math.prod(s)].square().sum() for o, s, n in _offsets(names, shapes)
                        if ".lora_B." in n) / flat.square().sum())
    info = {"corpus_examples": len(corpus), "examples": len(encoded), "gradient_dim": dim,
            "lora_params": len(names), "mean_tokens": float(np.mean([e.num_tokens for e in encoded])),
            "pretrain_steps": args.pretrain_steps, "pretrain_final_loss": final_loss, "pretrain_s": pretrain_s,
            "lora_steps": args.lora_steps, "lora_final_loss": lora_loss, "lora_train_s": lora_s,
            "lora_b_norm": b_norm, "gradient_norm_share_lora_b": b_share,
            "per_example_grads_s": grads_s, "mean_example_loss": float(torch.cat(losses).mean()),
            "families": sorted({r["dataset"] for r in records})}
    return names, shapes, flat, info


def _offsets(names, shapes):
    offset = 0
    for name, shape in zip(names, shapes):
        yield offset, shape, name
        offset += math.prod(shape)


# ----------------------------------------------------------------------------- projections


def gradstore_projection(names, shapes, flat: torch.Tensor, dim: int, seed: int, kind: str) -> torch.Tensor:
    """``Σ_p R_pᵀ vec(g_p)`` with gradstore's projector of ``kind``, parameter by parameter."""
    from gradstore.indexer.projection import ProjectionSpec, make_projector

    projector = make_projector(ProjectionSpec(kind=kind, dim=dim, seed=seed), cache_bytes=0)
    out = torch.zeros(flat.shape[0], dim, dtype=torch.float32)
    offset = 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape)
        out += projector.project(name, flat[:, offset:offset + size].reshape(flat.shape[0], *shape))
        offset += size
    return out


def gaussian_projection(flat: torch.Tensor, dim: int, seed: int, block_rows: int = 4096) -> torch.Tensor:
    """``flat @ G`` with one dense ``G = randn(D, k) / sqrt(k)``, generated in row blocks."""
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    out = torch.zeros(flat.shape[0], dim, dtype=torch.float32)
    for start in range(0, flat.shape[1], block_rows):
        stop = min(flat.shape[1], start + block_rows)
        out += flat[:, start:stop] @ torch.randn(stop - start, dim, generator=generator)
    return out / math.sqrt(dim)


# ------------------------------------------------------------------------------- statistics


def pair_values(matrix: np.ndarray) -> np.ndarray:
    upper = np.triu_indices(matrix.shape[0], k=1)
    return matrix[upper]


def errors(projected: torch.Tensor, norms: np.ndarray, exact: np.ndarray) -> dict[str, np.ndarray]:
    p = projected.double().numpy()
    gram = p @ p.T
    pnorm = np.sqrt(np.diag(gram))
    cos = gram / np.outer(pnorm, pnorm)
    ip = gram / np.outer(norms, norms)
    return {"cos": pair_values(cos) - exact, "ip": pair_values(ip) - exact, "cos_values": pair_values(cos)}


def summarize(errs: np.ndarray, projected: np.ndarray, exact_pooled: np.ndarray) -> dict:
    return {"mean": float(errs.mean()), "std": float(errs.std()), "max_abs": float(np.abs(errs).max()),
            "pearson": float(np.corrcoef(projected, exact_pooled)[0, 1])}


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=400, help="examples (all pairs are compared)")
    parser.add_argument("--kind", default="sjlt,rademacher",
                        help="gradstore projection kinds, comma-separated: sjlt (the indexer's default), rademacher")
    parser.add_argument("--dims", default="1024,4096,8192", help="projection dims k, comma-separated")
    parser.add_argument("--seeds", type=int, default=2, help="gradstore projection seeds (errors pooled)")
    parser.add_argument("--gaussian-seeds", type=int, default=6,
                        help="Gaussian projection seeds (cheap; their spread shows the sampling noise)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="full-model pretraining steps")
    parser.add_argument("--lora-steps", type=int, default=30, help="LoRA training steps (so B != 0)")
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="corpus, model and LoRA seed")
    parser.add_argument("--tolerance", type=float, default=0.10, help="target: |std ratio - 1| <= this")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
          f"numpy {info['numpy']}; load average {info['loadavg_start']}", flush=True)
    dims = [int(d) for d in args.dims.split(",")]
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("sjlt", "rademacher")]
    if not kinds or unknown:
        parser.error(f"--kind: expected sjlt and/or rademacher, got {args.kind!r}")
    with tempfile.TemporaryDirectory(prefix="gradstore-fidelity-") as tmp:
        names, shapes, flat, grad_info = real_gradients(args, Path(tmp))
    print(f"{grad_info['examples']} examples, gradient dim D = {grad_info['gradient_dim']:,} "
          f"({grad_info['lora_params']} LoRA matrices), pretrain {grad_info['pretrain_steps']} steps "
          f"(last loss {grad_info['pretrain_final_loss']:.2f}), LoRA {grad_info['lora_steps']} steps (last loss "
          f"{grad_info['lora_final_loss']:.2f}; B's share of the squared gradient norm "
          f"{grad_info['gradient_norm_share_lora_b']:.2f}); mean example loss {grad_info['mean_example_loss']:.2f}; "
          f"per-example gradients in {grad_info['per_example_grads_s']:.1f} s", flush=True)

    exact_full = flat.double().numpy()
    norms = np.linalg.norm(exact_full, axis=1)
    unit = exact_full / norms[:, None]
    exact = pair_values(unit @ unit.T)
    del exact_full, unit
    quantiles = np.quantile(exact, [0.01, 0.25, 0.5, 0.75, 0.99])
    print(f"exact cosine over {len(exact):,} pairs: mean {exact.mean():.3f}, std {exact.std():.3f}, "
          f"quantiles 1/25/50/75/99 % = {', '.join(f'{q:.3f}' for q in quantiles)}", flush=True)

    results = []
    for dim in dims:
        theory_ip = math.sqrt(float(np.mean(1 + exact ** 2)) / dim)
        theory_cos = math.sqrt(float(np.mean((1 - exact ** 2) ** 2)) / dim)
        row = {"k": dim, "theory_ip_std": theory_ip, "theory_cos_std": theory_cos}
        methods = [(kind, (lambda s, kind=kind: gradstore_projection(names, shapes, flat, dim, s, kind)), args.seeds)
                   for kind in kinds]
        methods.append(("gaussian", lambda s: gaussian_projection(flat, dim, s), args.gaussian_seeds))
        for method, project, seeds in methods:
            pooled = {"cos": [], "ip": [], "cos_values": []}
            per_seed_std, seconds = [], 0.0
            for seed in range(seeds):
                start = time.perf_counter()
                projected = project(seed)
                seconds += time.perf_counter() - start
                e = errors(projected, norms, exact)
                for key in pooled:
                    pooled[key].append(e[key])
                per_seed_std.append(float(e["cos"].std()))
            exact_pooled = np.tile(exact, seeds)
            cos_err, ip_err = np.concatenate(pooled["cos"]), np.concatenate(pooled["ip"])
            row[method] = {
                "cos": summarize(cos_err, np.concatenate(pooled["cos_values"]), exact_pooled),
                "ip": summarize(ip_err, exact_pooled + ip_err, exact_pooled),
                "cos_std_per_seed": per_seed_std, "seeds": seeds, "projection_s": seconds,
            }
            print(f"k={dim}: {method:<10} cos error std {row[method]['cos']['std']:.5f} "
                  f"(per seed {', '.join(f'{v:.5f}' for v in per_seed_std)}; {seconds:.1f} s)", flush=True)
        for kind in kinds:
            row[kind]["std_ratio_cos"] = row[kind]["cos"]["std"] / row["gaussian"]["cos"]["std"]
            row[kind]["std_ratio_ip"] = row[kind]["ip"]["std"] / row["gaussian"]["ip"]["std"]
            row[kind]["target_met"] = abs(row[kind]["std_ratio_cos"] - 1) <= args.tolerance
        results.append(row)

    print(f"\nProjected cosine error vs exact full-gradient cosine: {grad_info['examples']} real examples, "
          f"{len(exact):,} pairs, D = {grad_info['gradient_dim']:,}; errors pooled over {args.seeds} seeds per "
          f"gradstore kind and {args.gaussian_seeds} Gaussian seeds; ratio = std / Gaussian std")
    header = (f"{'k':>5} {'projection':<10} {'mean':>9} {'std':>8} {'ratio':>6} {'max|err|':>8} {'pearson':>8} "
              f"{'theory':>8} | {'ip std':>8} {'ratio':>6} {'ip theory':>9}")
    print(header)
    print("-" * len(header))
    for row in results:
        for method in (*kinds, "gaussian"):
            c, i = row[method]["cos"], row[method]["ip"]
            ratio = f"{row[method]['std_ratio_cos']:>6.3f}" if method != "gaussian" else f"{'':>6}"
            ratio_ip = f"{row[method]['std_ratio_ip']:>6.3f}" if method != "gaussian" else f"{'':>6}"
            print(f"{row['k']:>5} {method:<10} {c['mean']:>+9.5f} {c['std']:>8.5f} {ratio} {c['max_abs']:>8.4f} "
                  f"{c['pearson']:>8.5f} {row['theory_cos_std']:>8.5f} | {i['std']:>8.5f} {ratio_ip} "
                  f"{row['theory_ip_std']:>9.5f}")
        spread = row["gaussian"]["cos_std_per_seed"]
        print(f"{'':>5} Gaussian per-seed std {min(spread):.5f}..{max(spread):.5f}")
    met = {kind: all(r[kind]["target_met"] for r in results) for kind in kinds}
    for kind in kinds:
        print(f"Target ({kind}): cos error std within {args.tolerance:.0%} of the dense Gaussian's at every k: "
              f"{'MET' if met[kind] else 'NOT MET'}")
    info["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "projection_fidelity", "args": {**vars(args), "json": str(args.json)},
                   "machine": info, "gradients": grad_info,
                   "exact_cosine": {"pairs": int(len(exact)), "mean": float(exact.mean()), "std": float(exact.std()),
                                    "quantiles_1_25_50_75_99": quantiles.tolist()},
                   "results": results, "target_met": met}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
