"""Whole MoE layer (router + dispatch + experts + combine) on one GPU: ours against baselines.

Legend: T tokens, H hidden, F ffn, E experts, K top-k, C capacity slots, G token groups.

Times, in one run and on the same inputs and weights (bf16, SwiGLU, dropless unless noted),
forward and forward+backward of:

- ``triton``: ``MoE(backend="triton")`` (fused router, gather/scatter-fused grouped GEMMs);
- ``torch``: ``MoE(backend="torch")`` (torch router, dispatcher, torch._grouped_mm on Hopper);
- ``grouped_mm``: a torch._grouped_mm layer written the straightforward way (argsort gather,
  three grouped_mm, scatter_add);
- ``einsum``: a GShard/DeepSpeed capacity-einsum layer (capacity factor 1.25; dispatch and
  combine tensors ``[G, S, E, C]``; one group when that tensor fits in 2^31 elements, else the
  tokens are split into GShard groups, halving the group size until it fits);
- ``loop``: a per-expert loop (nonzero, index, three matmuls, index_add);
- ``dense``: a cuBLAS bf16 GEMM 8192^3, the rate the useful FLOPs are compared against.

Useful FLOPs: forward ``2 * T * K * H * 3F``, backward twice that (DESIGN.md). Also times the
router alone against the eager PyTorch router, and (``--breakdown``) each of our kernels against
torch._grouped_mm on the same GEMM shapes.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/moe_layer_benchmark.py --out results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_moe import MoE
from lightning_moe.kernels import triton_route

SHAPES = [
    (16384, 4096, 14336, 8, 2),
    (16384, 2048, 1408, 64, 6),
    (16384, 1024, 4096, 32, 2),
    (32768, 4096, 512, 128, 8),
    (40960, 768, 256, 128, 8),
]
ROUTER_E_K = [(8, 2), (64, 6), (128, 8), (256, 8)]


def timeit(fn, target_s: float = 0.5, min_iters: int = 3, max_iters: int = 100) -> float:
    """Median milliseconds of ``fn`` (CUDA events), after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    n = int(min(max_iters, max(min_iters, target_s / max(est, 1e-6))))
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _route(x, wg, k):
    logits = x.float() @ wg.float().t()
    probs = logits.softmax(-1)
    top_w, top_i = probs.topk(k, dim=-1)
    return probs, top_w / top_w.sum(-1, keepdim=True), top_i


def _aux(probs, counts, k):
    E = probs.shape[-1]
    return E * (probs.reshape(-1, E).mean(0) * counts.float() / counts.sum()).sum()


def grouped_mm_layer(x, wg, w1, w3, w2, k):
    """The straightforward torch._grouped_mm MoE layer (dropless)."""
    E = wg.shape[0]
    probs, top_w, top_i = _route(x, wg, k)
    flat = top_i.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
    out = torch._grouped_mm(h, w2, offs=offs) * top_w.reshape(-1)[order, None].to(x.dtype)
    y = torch.zeros_like(x).index_add_(0, tok, out)
    return y, _aux(probs, counts, k)


def einsum_layer(x, wg, w1, w3, w2, k, capacity_factor=1.25):
    """GShard/DeepSpeed capacity-einsum MoE layer (one-hot dispatch/combine tensors)."""
    T, H = x.shape
    E = wg.shape[0]
    S = T
    while S * T * k * capacity_factor > 2**31 and S % 2 == 0 and S > 4096:
        S //= 2
    G = T // S
    C = math.ceil(S * k / E * capacity_factor)
    xg = x.view(G, S, H)
    probs, top_w, top_i = _route(xg, wg, k)
    masks = F.one_hot(top_i, E)  # [G, S, K, E]
    used = torch.zeros(G, 1, E, device=x.device, dtype=torch.long)
    combine = None
    kept = []
    for j in range(k):
        m = masks[:, :, j]
        loc = torch.cumsum(m, 1) - 1 + used
        used = used + m.sum(1, keepdim=True)
        loc_s = (loc * m).sum(-1)
        keep = loc_s < C
        kept.append(keep)
        w = top_w[..., j] * keep
        part = torch.einsum(
            "gse,gsc->gsec", (w[..., None] * m).to(x.dtype), F.one_hot(loc_s.clamp(max=C - 1), C).to(x.dtype)
        )
        combine = part if combine is None else combine + part
    dispatch = (combine != 0).to(x.dtype)
    xe = torch.einsum("gsec,gsh->gech", dispatch, xg)
    h = F.silu(torch.einsum("gech,ehf->gecf", xe, w1)) * torch.einsum("gech,ehf->gecf", xe, w3)
    out = torch.einsum("gecf,efh->gech", h, w2)
    y = torch.einsum("gsec,gech->gsh", combine, out).reshape(T, H)
    return y, _aux(probs, masks.sum((0, 1, 2)), k)


def loop_layer(x, wg, w1, w3, w2, k):
    """Per-expert loop MoE layer (dropless)."""
    E = wg.shape[0]
    probs, top_w, top_i = _route(x, wg, k)
    y = torch.zeros_like(x)
    for e in range(E):
        tok, j = torch.nonzero(top_i == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        out = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]
        y.index_add_(0, tok, out * top_w[tok, j, None].to(x.dtype))
    return y, _aux(probs, torch.bincount(top_i.reshape(-1), minlength=E), k)


def _moe(H, Fd, E, k, backend, params):
    with torch.device("meta"):
        moe = MoE(H, Fd, E, k, capacity_factor=None, backend=backend)
    wg, w1, w3, w2 = params
    del moe.router.weight, moe.experts.w1, moe.experts.w3, moe.experts.w2
    moe.router.weight, moe.experts.w1, moe.experts.w3, moe.experts.w2 = wg, w1, w3, w2
    return moe


def bench_layer(shape, methods, dense_tflops, results):
    T, H, Fd, E, k = shape
    torch.manual_seed(0)
    dt = torch.bfloat16
    params = [
        torch.nn.Parameter(torch.randn(E, H, device="cuda", dtype=dt) * (0.1 * H**-0.5)),
        torch.nn.Parameter(torch.randn(E, H, Fd, device="cuda", dtype=dt) * H**-0.5),
        torch.nn.Parameter(torch.randn(E, H, Fd, device="cuda", dtype=dt) * H**-0.5),
        torch.nn.Parameter(torch.randn(E, Fd, H, device="cuda", dtype=dt) * Fd**-0.5),
    ]
    x = torch.randn(T, H, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(T, H, device="cuda", dtype=dt)
    flops_fwd = 2 * T * k * H * 3 * Fd
    fns = {}
    moe_triton = _moe(H, Fd, E, k, "triton", params)
    moe_torch = _moe(H, Fd, E, k, "torch", params)

    def wrap_module(m):
        def f():
            return m(x), m.aux_loss

        return f

    fns["triton"] = wrap_module(moe_triton)
    fns["torch"] = wrap_module(moe_torch)
    fns["grouped_mm"] = lambda: grouped_mm_layer(x, *params, k)
    fns["einsum"] = lambda: einsum_layer(x, *params, k)
    fns["loop"] = lambda: loop_layer(x, *params, k)
    row = {"shape": shape, "flops_fwd": flops_fwd, "dense_tflops": dense_tflops}
    ys = {}
    for name in methods:
        fn = fns[name]
        try:
            with torch.no_grad():
                ys[name] = fn()[0].float()

            def fwd(fn=fn):
                return fn()

            def fwd_bwd(fn=fn):
                x.grad = None
                for p in params:
                    p.grad = None
                y, aux = fn()
                torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])

            t_f = timeit(fwd)
            t_fb = timeit(fwd_bwd)
            row[name] = {
                "fwd_ms": t_f,
                "fwd_bwd_ms": t_fb,
                "fwd_tflops": flops_fwd / t_f / 1e9,
                "fwd_bwd_tflops": 3 * flops_fwd / t_fb / 1e9,
            }
        except torch.OutOfMemoryError as err:
            row[name] = {"error": f"OOM: {str(err)[:120]}"}
        except Exception as err:  # a baseline that cannot run is reported, not fatal
            row[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        torch.cuda.empty_cache()
        print(f"  {shape} {name}: {row[name]}", flush=True)
    if "triton" in ys:
        for name in ("torch", "grouped_mm", "loop"):
            if name in ys:
                err = ((ys["triton"] - ys[name]).norm() / ys[name].norm()).item()
                row.setdefault("y_rel_err_vs", {})[name] = err
    results.append(row)


def _time_router(router, x, route) -> dict:
    def fwd():
        return route()

    def fwd_bwd():
        x.grad = None
        router.weight.grad = None
        r = route()
        (r.weights.sum() + r.aux_loss + r.z_loss).backward()

    return {"fwd_ms": timeit(fwd, 0.3), "fwd_bwd_ms": timeit(fwd_bwd, 0.3)}


def profile_router(results):
    """Where the fused router's time goes: each kernel alone (GPU) and the host time of a call."""
    from lightning_moe.kernels import router as rk

    T, H, E, k = 16384, 4096, 64, 6
    torch.manual_seed(0)
    moe = MoE(H, 64, E, k, capacity_factor=1.25, random_token_selection=True).cuda()
    router = moe.router.train()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    row = {"T": T, "H": H, "E": E, "k": k}
    for name, fn in (("eager", lambda: router(x)), ("triton", lambda: triton_route(router, x))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        row[f"{name}_host_ms_per_call"] = host * 1e3
    w = router.weight
    logits = torch.empty(T, E, device="cuda")
    row["logits_kernel_ms"] = timeit(
        lambda: rk._logits_kernel[(T // 64, 1)](
            x, w, logits, T, H, E, H, H, SPLIT=True, PRECISION="tf32", BLOCK_T=64, BLOCK_E=64, BLOCK_H=64
        ),
        0.1,
    )
    # The fused forward's GPU time alone: replayed from a CUDA graph (no host work per call).
    try:
        xd = x.detach()
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    rk.fused_route(xd, w, k, 1.25, random_priority=True)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                rk.fused_route(xd, w, k, 1.25, random_priority=True)
        row["triton_fwd_graph_ms"] = timeit(graph.replay, 0.1)
    except Exception as err:  # capture can fail on other torch versions: report, do not stop
        row["triton_fwd_graph_ms"] = f"{type(err).__name__}: {str(err)[:80]}"
    row["torch_fp32_logits_ms"] = timeit(lambda: x.float() @ w.t(), 0.1)
    print(f"  router profile {row}", flush=True)
    results.append(row)


def bench_router(results):
    for H in (2048, 4096):
        for E, k in ROUTER_E_K:
            T = 16384
            torch.manual_seed(0)
            moe = MoE(H, 64, E, k, capacity_factor=1.25, random_token_selection=True).cuda()
            router = moe.router.train()
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            row = {"T": T, "H": H, "E": E, "k": k}
            row["eager"] = _time_router(router, x, lambda router=router, x=x: router(x))
            row["triton"] = _time_router(router, x, lambda router=router, x=x: triton_route(router, x))
            row["speedup_fwd"] = row["eager"]["fwd_ms"] / row["triton"]["fwd_ms"]
            row["speedup_fwd_bwd"] = row["eager"]["fwd_bwd_ms"] / row["triton"]["fwd_bwd_ms"]
            print(f"  router {row}", flush=True)
            results.append(row)


def routed_inputs(shape):
    """Inputs of the per-kernel timings at one shape: bf16 tokens routed by the fused router
    (dropless, balanced), expert weights, the up projection's outputs, an output gradient and
    the backward's expert-ordered rows (``dys = w dy[token]``, ``x_sorted``)."""
    from types import SimpleNamespace

    from lightning_moe.kernels import grouped_gemm as gg
    from lightning_moe.kernels.router import fused_route

    T, H, Fd, E, k = shape
    dt = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=dt)
    r = fused_route(x, torch.randn(E, H, device="cuda") * 0.1 * H**-0.5, k, None)
    P = T * k
    w1 = torch.randn(E, H, Fd, device="cuda", dtype=dt) * H**-0.5
    w3 = torch.randn_like(w1)
    w2 = torch.randn(E, Fd, H, device="cuda", dtype=dt) * Fd**-0.5
    counts, rp, wts = r.kept_per_expert, r.row_pair, r.weights.reshape(-1).contiguous()
    g, u, h = gg.ffn_up(x, rp, k, w1, w3, counts, P, "swiglu")
    dy = torch.randn(T, H, device="cuda", dtype=dt)
    return SimpleNamespace(
        T=T, H=H, Fd=Fd, E=E, k=k, P=P, dt=dt, x=x, r=r, w1=w1, w3=w3, w2=w2, counts=counts, rp=rp,
        wts=wts, g=g, u=u, h=h, dy=dy, dys=gg.gather_rows(dy, rp, k, counts, P, scale=wts),
        x_sorted=gg.gather_rows(x, rp, k, counts, P), offs=torch.cumsum(counts, 0).to(torch.int32),
        gemm=2 * P * H * Fd,
    )  # fmt: skip


def bench_breakdown(shape, results, sweep=False):
    """Each of our kernels vs torch._grouped_mm on the same GEMM (dropless, balanced routing)."""
    from lightning_moe.kernels import grouped_gemm as gg
    from lightning_moe.kernels.combine import combine, combine_weights_grad

    d = routed_inputs(shape)
    H, Fd, k, P, dt, x, r = d.H, d.Fd, d.k, d.P, d.dt, d.x, d.r
    w1, w3, w2, counts, rp, wts, g, u, h = d.w1, d.w3, d.w2, d.counts, d.rp, d.wts, d.g, d.u, d.h
    dys, x_sorted, dy, offs, gemm = d.dys, d.x_sorted, d.dy, d.offs, d.gemm
    w2t, w1t, w3t = (w.transpose(1, 2).contiguous() for w in (w2, w1, w3))
    slots = x.new_empty(P, H)
    xs = torch.randn(P, H, device="cuda", dtype=dt)
    hs = torch.randn(P, Fd, device="cuda", dtype=dt)
    rows = {}

    def rec(name, fn, flops):
        try:
            ms = timeit(fn, 0.2)
            rows[name] = {"ms": ms, "tflops": flops / ms / 1e9 if flops else None}
        except Exception as err:
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:100]}"}

    rec("ours up (gather, w1+w3, swiglu)", lambda: gg.ffn_up(x, rp, k, w1, w3, counts, P, "swiglu"), 2 * gemm)
    rec("torch gather x[tok]", lambda: x[rp.long() // k], 0)
    rec("torch _grouped_mm x@w1 (x2 for up)", lambda: torch._grouped_mm(xs, w1, offs=offs), gemm)
    rec("ours down (scatter)", lambda: gg.grouped_mm(h, w2, counts, slots, row_pair=rp), gemm)
    rec("torch _grouped_mm h@w2", lambda: torch._grouped_mm(hs, w2, offs=offs), gemm)
    rec("ours combine", lambda: combine(slots, r.kept, r.weights, dt), 0)
    rec("ours combine bwd (dweights)", lambda: combine_weights_grad(dy, slots, r.kept), 0)
    rec("transpose w2 (contiguous w2^T)", lambda: w2.transpose(1, 2).contiguous(), 0)
    rec("ours gather_rows (w * dy[token])", lambda: gg.gather_rows(dy, rp, k, counts, P, scale=wts), 0)
    rec(
        "ours act_bwd (dh GEMM, w2^T view, then swiglu')",
        lambda: gg.act_bwd(dys, w2.transpose(1, 2), g, u, counts, "swiglu"),
        gemm,
    )
    rec("torch _grouped_mm dy@w2^T", lambda: torch._grouped_mm(xs, w2.transpose(1, 2), offs=offs), gemm)
    rec("ours wgrad dW2 (h^T @ dys)", lambda: gg.wgrad(h, dys, counts, dt), gemm)
    rec("torch _grouped_mm dW2 (h^T @ dy)", lambda: torch._grouped_mm(hs.t(), xs, offs=offs), gemm)
    rec(
        "ours dx (dg@w1^T + du@w3^T contiguous, scatter)",
        lambda: gg.grouped_mm(g, w1t, counts, slots, row_pair=rp, a2=u, b2_ERN=w3t),
        2 * gemm,
    )
    rec(
        "ours dx (w1^T, w3^T as K-major views)",
        lambda: gg.grouped_mm(g, w1.transpose(1, 2), counts, slots, row_pair=rp, a2=u, b2_ERN=w3.transpose(1, 2)),
        2 * gemm,
    )
    rec(
        "ours wgrad dW1+dW3 (x_sorted^T @ dg, du)",
        lambda: gg.wgrad(x_sorted, g, counts, dt, b2=u),
        2 * gemm,
    )
    rec("torch _grouped_mm dW1 (x^T @ dg)", lambda: torch._grouped_mm(xs.t(), hs, offs=offs), gemm)
    if sweep:
        cfgs = [
            gg.GemmConfig(128, 128, 64, 8, 8, 3),
            gg.GemmConfig(128, 128, 64, 8, 8, 4),
            gg.GemmConfig(128, 256, 64, 8, 8, 3),
            gg.GemmConfig(128, 64, 64, 8, 4, 4),
            gg.GemmConfig(64, 128, 64, 8, 4, 4),
        ]
        for c in cfgs:
            tag = f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
            for name, fn, fl in (
                ("up", lambda c=c: gg.ffn_up(x, rp, k, w1, w3, counts, P, "swiglu", config=c), 2 * gemm),
                (
                    "dx",
                    lambda c=c: gg.grouped_mm(g, w1t, counts, slots, row_pair=rp, a2=u, b2_ERN=w3t, config=c),
                    2 * gemm,
                ),
                ("down", lambda c=c: gg.grouped_mm(h, w2, counts, slots, row_pair=rp, config=c), gemm),
                ("act_bwd", lambda c=c: gg.act_bwd(dys, w2t, g, u, counts, "swiglu", config=c), gemm),
                ("wgrad13", lambda c=c: gg.wgrad(x_sorted, g, counts, dt, b2=u, config=c), 2 * gemm),
            ):
                if name == "up" and c.block_n == 256:
                    continue
                rec(f"sweep {name} {tag}", fn, fl)
    for name, v in rows.items():
        print(f"  {shape} {name}: {v}", flush=True)
    results.append({"shape": shape, "kernels": rows})


def dense_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timeit(lambda: a @ b, 0.5)
    return 2 * 8192**3 / ms / 1e9


def tables(layer_rows, router_rows) -> str:
    names = ["triton", "torch", "grouped_mm", "einsum", "loop"]
    out = []
    for mode in ("fwd", "fwd_bwd"):
        out.append(f"\n{mode.replace('_', '+')}: useful TFLOP/s (ms)")
        out.append(
            "| T, H, F, E, k | " + " | ".join(names) + " | vs torch | vs grouped_mm | vs einsum | vs loop | of dense |"
        )
        out.append("|" + " --- |" * (len(names) + 6))
        for row in layer_rows:
            cells = []
            for n in names:
                v = row.get(n, {})
                cells.append(
                    f"{v[mode + '_tflops']:.0f} ({v[mode + '_ms']:.2f})"
                    if mode + "_ms" in v
                    else v.get("error", "-")[:12]
                )

            def ratio(n, row=row, key=mode + "_ms"):
                a, b = row.get("triton", {}), row.get(n, {})
                return f"{b[key] / a[key]:.2f}x" if key in a and key in b else "-"

            tri = row.get("triton", {})
            dense = f"{tri[mode + '_tflops'] / row['dense_tflops']:.0%}" if mode + "_tflops" in tri else "-"
            out.append(
                f"| {', '.join(map(str, row['shape']))} | "
                + " | ".join(cells)
                + f" | {ratio('torch')} | {ratio('grouped_mm')} | {ratio('einsum')} | {ratio('loop')} | {dense} |"
            )
    if router_rows:
        out.append("\nrouter alone, T=16384, bf16 x, capacity 1.25 + RTS (ms)")
        out.append("| H | E | k | eager fwd | triton fwd | speedup | eager fwd+bwd | triton fwd+bwd | speedup |")
        out.append("|" + " --- |" * 9)
        for r in router_rows:
            out.append(
                f"| {r['H']} | {r['E']} | {r['k']} | {r['eager']['fwd_ms']:.3f} | {r['triton']['fwd_ms']:.3f} | "
                f"{r['speedup_fwd']:.1f}x | {r['eager']['fwd_bwd_ms']:.3f} | {r['triton']['fwd_bwd_ms']:.3f} | "
                f"{r['speedup_fwd_bwd']:.1f}x |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="0,1,2,3,4", help="indices into SHAPES")
    parser.add_argument("--methods", default="triton,torch,grouped_mm,einsum,loop")
    parser.add_argument("--no-router", action="store_true")
    parser.add_argument("--breakdown", default="", help="shape indices for the per-kernel breakdown")
    parser.add_argument("--sweep", default="", help="shape indices for the tile-config sweep")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip remaining shapes after this long")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    t0 = time.time()
    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(info, flush=True)
    dense = dense_rate()
    print(f"dense bf16 GEMM 8192^3: {dense:.0f} TFLOP/s", flush=True)
    layer_rows, router_rows, kernel_rows = [], [], []
    results = {"info": info, "dense_tflops": dense, "layer": layer_rows, "router": router_rows, "kernels": kernel_rows}

    def save():
        with open(os.path.join(args.out, "moe_layer_benchmark.json"), "w") as f:
            json.dump(results, f, indent=1)

    if not args.no_router:
        bench_router(router_rows)
        save()
        profile = []
        profile_router(profile)
        results["router_profile"] = profile
        save()
    methods = args.methods.split(",")
    for i in [int(s) for s in args.shapes.split(",") if s]:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: skipping shape {SHAPES[i]}", flush=True)
            continue
        bench_layer(SHAPES[i], methods, dense, layer_rows)
        save()
    breakdown = {int(s) for s in args.breakdown.split(",") if s}
    sweep = {int(s) for s in args.sweep.split(",") if s}
    for i in sorted(breakdown | sweep):
        if time.time() - t0 > args.budget_s:
            continue
        bench_breakdown(SHAPES[i], kernel_rows, sweep=i in sweep)
        save()
    text = tables(layer_rows, router_rows)
    with open(os.path.join(args.out, "moe_layer_benchmark.md"), "w") as f:
        f.write(text + "\n")
    print(f"dense bf16 GEMM 8192^3: {dense:.0f} TFLOP/s; total {time.time() - t0:.0f}s")
    for row in results.get("router_profile", []):
        print(f"router profile: {row}")
    print(text)


if __name__ == "__main__":
    main()
