"""Backward kernels of the fused expert FFN: tile sweep against torch._grouped_mm.

Legend: T tokens, H hidden, F ffn, E experts, K top-k, P = T * K rows (dropless).

For each shape (bf16, SwiGLU, dropless routing from the fused router), times in one run:

- ``gather_rows``: the token rows of ``dy`` (times the combine weight) and of ``x`` in expert
  order, the one memory pass the backward spends so that its GEMMs read contiguous rows;
- ``dh``: ``act_bwd`` (grouped GEMM ``dys @ w2^T``, then the activation's backward) per tile
  configuration of its GEMM, and the GEMM alone;
- ``dW2 = h^T @ dys`` and ``dW1, dW3 = xs^T @ (dg, du)`` (two accumulators, or two launches of one)
  per tile configuration;
- ``torch._grouped_mm`` on the same GEMMs.

Also profiles where the fused router's host time goes (``cProfile``, top functions). Prints the
best configuration per kernel and shape; full numbers in ``--out``/tune_backward.json.

The 2026-11-30 comparisons with a gather inside the weight-gradient loop and with the activation's
backward in the dh GEMM's epilogue (docs/kernels.md) were made with this script at commit 6910076,
before those variants were removed.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/tune_backward.py --shapes 0,1,2 --out results/
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moe_layer_benchmark import SHAPES, routed_inputs, timeit

from lightning_moe.kernels import grouped_gemm as gg
from lightning_moe.kernels.router import fused_route

C = gg.GemmConfig
DH_CONFIGS = [
    None,  # pick_config's choice
    C(128, 128, 64, num_warps=8, num_stages=4),
    C(128, 128, 64, num_warps=8, num_stages=3),
]
WGRAD_CONFIGS = [
    C(128, 128, 64, num_warps=8, num_stages=3),
    C(128, 128, 64, num_warps=8, num_stages=4),
    C(128, 256, 64, num_warps=8, num_stages=3),
    C(256, 128, 64, num_warps=8, num_stages=3),
    C(128, 64, 64, num_warps=4, num_stages=4),
    C(128, 128, 64, num_warps=4, num_stages=4),
    C(128, 128, 32, num_warps=4, num_stages=5),
    C(64, 128, 64, num_warps=4, num_stages=4),
]
DUAL_CONFIGS = [
    C(128, 128, 64, num_warps=8, num_stages=3),
    C(128, 128, 64, num_warps=8, num_stages=4),
    C(256, 128, 64, num_warps=8, num_stages=3),
    C(128, 64, 64, num_warps=4, num_stages=4),
    C(128, 128, 32, num_warps=8, num_stages=5),
    C(64, 128, 64, num_warps=4, num_stages=4),
]


def tag(c: gg.GemmConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"


def tune_shape(shape, deadline: float) -> dict:
    d = routed_inputs(shape)
    k, P, dt, x, counts, rp, wts = d.k, d.P, d.dt, d.x, d.counts, d.rp, d.wts
    g, u, h, dy, dys, xs, offs, gemm = d.g, d.u, d.h, d.dy, d.dys, d.x_sorted, d.offs, d.gemm
    w2t = d.w2.transpose(1, 2)
    rows: dict[str, dict] = {}

    def rec(group: str, name: str, fn, flops: int) -> None:
        if time.time() > deadline:
            rows[f"{group} | {name}"] = {"skipped": "budget"}
            return
        try:
            ms = timeit(fn, 0.15)
            rows[f"{group} | {name}"] = {"ms": ms, "tflops": flops / ms / 1e9 if flops else None}
        except Exception as err:  # out of shared memory, etc.
            rows[f"{group} | {name}"] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}

    rec("gather", "dys = w * dy[rows]", lambda: gg.gather_rows(dy, rp, k, counts, P, scale=wts), 0)
    rec("gather", "xs = x[rows]", lambda: gg.gather_rows(x, rp, k, counts, P), 0)
    rec("gather", "torch x[rows]", lambda: x[rp.long() // k], 0)
    rec("ref", "torch _grouped_mm dys @ w2^T", lambda: torch._grouped_mm(dys, w2t, offs=offs), gemm)
    rec("ref", "torch _grouped_mm h^T @ dys (dW2)", lambda: torch._grouped_mm(h.t(), dys, offs=offs), gemm)
    rec("ref", "torch _grouped_mm xs^T @ dg (dW1)", lambda: torch._grouped_mm(xs.t(), g, offs=offs), gemm)
    for c in DH_CONFIGS:
        rec(
            "dh",
            tag(c) if c else "default tile",
            lambda c=c: gg.act_bwd(dys, w2t, g, u, counts, "swiglu", config=c),
            gemm,
        )
    rec("dh", "the GEMM part alone", lambda: gg.grouped_mm(dys, w2t, counts, torch.empty_like(g)), gemm)
    for c in WGRAD_CONFIGS:
        rec("dW2", tag(c), lambda c=c: gg.wgrad(h, dys, counts, dt, config=c), gemm)
    for c in DUAL_CONFIGS:
        rec("dW13", "dual " + tag(c), lambda c=c: gg.wgrad(xs, g, counts, dt, b2=u, config=c), 2 * gemm)
    for c in WGRAD_CONFIGS[:6]:
        rec("dW13", "2 x single " + tag(c), lambda c=c: (gg.wgrad(xs, g, counts, dt, config=c),
                                                         gg.wgrad(xs, u, counts, dt, config=c)), 2 * gemm)  # fmt: skip
    best = {}
    for key, v in rows.items():
        group = key.split(" | ")[0]
        if "ms" in v and group in ("dh", "dW2", "dW13") and "alone" not in key:
            if group not in best or v["ms"] < best[group][1]:
                best[group] = (key, v["ms"], v["tflops"])
    return {"shape": shape, "rows": rows, "best": best}


def profile_router(T: int = 16384, H: int = 4096, E: int = 64, k: int = 6, calls: int = 50) -> dict:
    """Host time of the fused router: wall time per call (GPU not waited on) and the top functions."""
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    wg = torch.randn(E, H, device="cuda", requires_grad=True)

    def call():
        return fused_route(x, wg, k, 1.25, random_priority=True)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    gpu_ms = timeit(call, 0.3)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    return {"host_ms_per_call": host_ms, "event_ms_per_call": gpu_ms, "profile": buf.getvalue()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="0,1,2")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--no-router", action="store_true")
    args = parser.parse_args()
    start = time.time()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    import triton

    results["triton"] = triton.__version__
    path = os.path.join(args.out, "tune_backward.json")
    if not args.no_router:
        results["router"] = profile_router()
        print(f"router host {results['router']['host_ms_per_call']:.3f} ms/call, "
              f"events {results['router']['event_ms_per_call']:.3f} ms/call", flush=True)  # fmt: skip
        print(results["router"]["profile"][:6000], flush=True)
    idx = [int(s) for s in args.shapes.split(",") if s]
    for n, i in enumerate(idx):
        remaining = args.budget_s - (time.time() - start)
        deadline = time.time() + remaining / (len(idx) - n)
        res = tune_shape(SHAPES[i], deadline)
        results["shapes"].append(res)
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        for key, v in res["rows"].items():
            print(f"{SHAPES[i]} {key}: {v}", flush=True)
        torch.cuda.empty_cache()
    print("\nbest per kernel (ms, TFLOP/s):")
    for res in results["shapes"]:
        for group, (key, ms, tf) in res["best"].items():
            print(f"  {res['shape']} {group}: {key} {ms:.3f} ms {tf:.0f}")
        refs = {kk: vv for kk, vv in res["rows"].items() if kk.startswith("ref")}
        for kk, vv in refs.items():
            if "ms" in vv:
                print(f"  {res['shape']} {kk}: {vv['ms']:.3f} ms {vv['tflops']:.0f}")


if __name__ == "__main__":
    main()
