"""Training step of published MoE architectures: lightning_moe's MoEDecoder against transformers' own model.

For a Mixtral-shaped and a Qwen3-MoE-shaped model (depth reduced to fit one GPU, every layer MoE,
a 32k vocabulary for both so that the output layer does not dominate), times a full training step
(forward, cross-entropy, backward, fused AdamW step) of

- ``ours``: :class:`lightning_moe.models.MoEDecoder` (``moe_backend="triton"`` on CUDA: fused
  router and grouped-GEMM kernels; dropless routing, as the published models compute);
- ``hf``: the same architecture in transformers (``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM``,
  its default experts implementation, ``grouped_mm`` where available, and SDPA attention);

in two precision modes: ``bf16`` (bfloat16 weights and optimizer) and ``amp`` (float32 master
weights under ``torch.autocast(bfloat16)``). Both models start from the same weights (ours is
loaded from transformers' through ``lightning_moe.hf``). The dense bf16 GEMM rate (8192^3,
cuBLAS) is measured in the same run.

Model FLOPs of a step (docs/benchmarks.md): ``6 x active matmul parameters + 12 x layers x d_model
x sequence`` per token, with active matmul parameters = attention projections + ``top_k`` experts
+ router + output layer (the embedding lookup is not a matmul).

Usage (one H200, about 4 minutes)::

    python benchmarks/hf_train_step.py --json hf_train_step.json
    python benchmarks/hf_train_step.py --tiny --device cpu --steps 2   # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """One benchmark architecture."""

    name: str
    family: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    num_experts: int
    expert_ffn: int
    top_k: int
    vocab: int = 32000


SHAPES = {
    # Mixtral 8x7B: d 4096, 32 heads (8 kv), 8 experts of 14336, top-2 (32 layers; 4 here)
    "mixtral": Shape("mixtral", "mixtral", 4096, 4, 32, 8, 128, 8, 14336, 2),
    # Qwen3-30B-A3B: d 2048, 32 heads (4 kv) of 128, 128 experts of 768, top-8 (48 layers; 8 here)
    "qwen3_moe": Shape("qwen3_moe", "qwen3_moe", 2048, 8, 32, 4, 128, 128, 768, 8),
}
TINY = {
    "mixtral": Shape("mixtral", "mixtral", 64, 2, 4, 2, 16, 4, 128, 2, vocab=256),
    "qwen3_moe": Shape("qwen3_moe", "qwen3_moe", 64, 2, 4, 2, 16, 8, 32, 4, vocab=256),
}


def hf_config(shape: Shape):
    """The transformers config of ``shape``."""
    import transformers as tf

    common = dict(
        vocab_size=shape.vocab, hidden_size=shape.d_model, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=8192, tie_word_embeddings=False, num_experts_per_tok=shape.top_k,
    )  # fmt: skip
    if shape.family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=shape.expert_ffn, num_local_experts=shape.num_experts)
    return tf.Qwen3MoeConfig(
        **common, intermediate_size=4 * shape.d_model, moe_intermediate_size=shape.expert_ffn,
        num_experts=shape.num_experts, norm_topk_prob=True,
    )  # fmt: skip


def step_flops(shape: Shape, seq: int) -> float:
    """Model FLOPs of one token's training step."""
    D, Hd = shape.d_model, shape.head_dim
    attn = D * shape.n_heads * Hd * 2 + 2 * D * shape.n_kv_heads * Hd
    experts = shape.top_k * 3 * D * shape.expert_ffn
    router = shape.num_experts * D
    active = shape.n_layers * (attn + experts + router) + shape.vocab * D
    return 6 * active + 12 * shape.n_layers * D * seq


def dense_gemm_tflops(device: torch.device) -> float:
    """bf16 ``8192^3`` matmul rate (cuBLAS)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0 or iters < 5:
        a @ b
        iters += 1
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(which: str, shape: Shape, mode: str, device: torch.device, experts_impl: str | None):
    """The model of ``which`` (``"ours"`` or ``"hf"``) in the dtype of ``mode``; both get the same seeded weights.

    Our model is built on the device from a fixed seed; transformers' is built on the meta device
    and filled with ours through ``lightning_moe.hf.hf_state_dict`` (its in-memory, fused layout),
    so that no multi-GB random init or disk round trip is timed or needed.
    """
    import transformers as tf

    from lightning_moe.hf import adapter_for, hf_state_dict
    from lightning_moe.models import MoEDecoder

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    config = hf_config(shape)
    backend = "triton" if device.type == "cuda" else "torch"
    ours_config = adapter_for(shape.family).config_from_hf(config.to_dict())
    ours_config = dataclasses.replace(ours_config, moe_backend=backend)
    torch.manual_seed(0)
    with torch.device(device):
        ours = MoEDecoder(ours_config).to(dtype)
    if which == "ours":
        return ours, ours, f"ours ({backend})"
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, **kwargs)
    model.to_empty(device=device)
    model.load_state_dict(hf_state_dict(ours, layout="fused"), strict=True)
    del ours
    with torch.device(device):  # non-persistent rotary buffers: rebuild them
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    impl = getattr(model.config, "_experts_implementation", None) or "default"

    def logits(ids):
        return model(input_ids=ids, use_cache=False).logits

    return model, logits, f"hf ({impl})"


def time_steps(model, logits_fn, shape: Shape, mode: str, device, batch: int, seq: int, steps: int, budget_s: float):
    """Warm up, then time training steps; returns ``(seconds per step, steps timed, peak GiB)``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(shape.vocab, (batch, seq + 1), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "amp"):
            out = logits_fn(ids[:, :-1])
        loss = F.cross_entropy(out.float().reshape(-1, shape.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, t0 = 0, time.perf_counter()
    while n < steps and (n < 2 or time.perf_counter() - t0 < budget_s):
        step()
        n += 1
    _sync(device)
    seconds = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, n, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="mixtral,qwen3_moe")
    parser.add_argument("--modes", default="bf16,amp")
    parser.add_argument("--impls", default="ours,hf")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch x sequence)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--steps", type=int, default=8, help="most timed steps per configuration")
    parser.add_argument("--budget-s", type=float, default=200.0, help="time budget of all timed steps together")
    parser.add_argument("--experts-implementation", default=None, help="transformers' experts_implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    shapes = [(TINY if args.tiny else SHAPES)[s] for s in args.shapes.split(",")]
    modes, impls = args.modes.split(","), args.impls.split(",")
    seq = min(args.seq, 32) if args.tiny else args.seq
    tokens = min(args.tokens, 64) if args.tiny else args.tokens
    batch = max(1, tokens // seq)
    dense = dense_gemm_tflops(device)
    print(f"dense bf16 GEMM: {dense:.0f} TFLOP/s ({device})", flush=True)
    budget = args.budget_s / max(1, len(shapes) * len(modes) * len(impls))
    rows = []
    for shape in shapes:
        for mode in modes:
            for which in impls:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model, logits_fn, label = build(which, shape, mode, device, args.experts_implementation)
                try:
                    sec, n, peak = time_steps(model, logits_fn, shape, mode, device, batch, seq, args.steps, budget)
                except torch.OutOfMemoryError:
                    sec, n, peak = math.nan, 0, math.nan
                del model, logits_fn
                flops = step_flops(shape, seq) * batch * seq
                row = {
                    "shape": shape.name, "mode": mode, "impl": label, "layers": shape.n_layers,
                    "tokens_per_step": batch * seq, "ms_per_step": 1e3 * sec, "steps": n,
                    "tokens_per_s": batch * seq / sec, "tflops": flops / sec / 1e12, "peak_gib": peak,
                }  # fmt: skip
                row["pct_dense"] = 100 * row["tflops"] / dense
                rows.append(row)
                print(
                    f"{shape.name:10s} {mode:5s} {label:22s} {row['ms_per_step']:9.1f} ms  "
                    f"{row['tokens_per_s']:10.0f} tok/s  {row['tflops']:7.1f} TFLOP/s  "
                    f"({row['pct_dense']:.0f}% of dense)  peak {peak:.1f} GiB  [{n} steps]",
                    flush=True,
                )
    print("\n| shape | mode | ours TFLOP/s | transformers TFLOP/s | ours / transformers | ours % of dense GEMM |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        for mode in modes:
            ours = next(
                (r for r in rows if r["shape"] == shape.name and r["mode"] == mode and r["impl"].startswith("ours")),
                None,
            )
            hf = next(
                (r for r in rows if r["shape"] == shape.name and r["mode"] == mode and r["impl"].startswith("hf")), None
            )
            if ours is None or hf is None:
                continue
            print(
                f"| {shape.name} ({shape.n_layers} layers) | {mode} | {ours['tflops']:.0f} | {hf['tflops']:.0f} | "
                f"{ours['tflops'] / hf['tflops']:.2f}x | {ours['pct_dense']:.0f}% |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_tflops": dense, "device": str(device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
