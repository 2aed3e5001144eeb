"""GPU correctness of the Triton kernels: bf16/fp16 against the float32 torch reference.

Fresh random inputs every run. Checks the fused router (forward + backward), the fused expert FFN
(forward + backward, every activation, capacity drops, an expert with no tokens, all tokens on one
expert, T not a multiple of any block), run-to-run bitwise determinism of the outputs and weight
gradients, the whole MoE layer, and the expert-parallel path (2 processes over NCCL, if 2 GPUs).
Outputs are poisoned with NaN through the caching allocator before each kernel run, so an unwritten
element shows up as a NaN.

    CUDA_VISIBLE_DEVICES=0,1 python benchmarks/gpu_check.py --out results/
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# --cpu-smoke: the same checks at small sizes in float32 under the Triton interpreter, to test
# this script (and the kernels) before spending GPU time.
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if SMOKE else "cuda"
BF16 = torch.float32 if SMOKE else torch.bfloat16
FP16 = torch.float32 if SMOKE else torch.float16


def sz(n: int, div: int = 32) -> int:
    """A size, shrunk in --cpu-smoke mode."""
    return max(16, n // div) if SMOKE else n


from lightning_moe import MoE  # noqa: E402
from lightning_moe.kernels.moe_ffn import grouped_ffn, moe_experts  # noqa: E402
from lightning_moe.kernels.router import fused_route  # noqa: E402
from lightning_moe.moe import ExpertParallelGroup, Router, TokenDispatcher  # noqa: E402
from lightning_moe.moe.experts import GroupedExperts  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison() -> None:
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs read as NaN."""
    if SMOKE:
        return
    free = torch.cuda.mem_get_info()[0]
    n = min(int(free * 0.5), 8 << 30) // 4
    buf = torch.empty(n, device=DEV, dtype=torch.float32)
    buf.fill_(float("nan"))
    del buf


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def check(self, name: str, value: float, bound: float, higher_ok: bool = False) -> None:
        ok = (value >= bound) if higher_ok else (value <= bound)
        ok = ok and not math.isnan(value)
        self.rows.append({"check": name, "value": value, "bound": bound, "ok": bool(ok)})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3e} (bound {bound:.1e})", flush=True)


def check_router(rep: Report) -> None:
    cases = [
        # T, H, E, K, capacity_factor, padding
        (8192, 1024, 64, 6, 1.25, False),
        (8191, 512, 8, 2, None, True),
        (4096, 768, 256, 8, 1.0, False),
        (5000, 2048, 128, 1, 1.0, True),
    ]
    for T, H, E, K, cf, pad in cases:
        T, H = sz(T), sz(H)
        tag = f"router T={T} H={H} E={E} K={K} cf={cf} pad={pad}"
        router = Router(H, E, K, capacity_factor=cf, min_capacity=4, random_token_selection=False).to(DEV)
        with torch.no_grad():
            router.weight.normal_(std=H**-0.5)
        x = torch.randn(T, H, device=DEV).to(BF16).requires_grad_(True)
        mask = (torch.rand(T, device=DEV) < 0.1) if pad else None
        poison()
        r = fused_route(x, router.weight, K, cf, 4, mask)
        x_ref = x.detach().float().requires_grad_(True)
        ref = router(x_ref.detach(), mask)
        same = (r.expert_indices == ref.expert_indices).all(-1)
        rep.check(f"{tag}: top-k index mismatch fraction (near-ties)", 1 - same.float().mean().item(), 5e-3)
        # Where indices differ, ours are still a top-k of the float32 probabilities (a near-tie).
        p_sel = ref.probs.detach().gather(1, r.expert_indices)
        p_top = ref.probs.detach().gather(1, ref.expert_indices)
        rep.check(f"{tag}: top-k prob values max abs diff", (p_sel - p_top).abs().max().item(), 1e-5)
        if cf is not None:
            rep.check(f"{tag}: kept mismatch fraction", (r.kept != ref.kept).float().mean().item(), 5e-3)
        keep = same & (r.kept == ref.kept).all(-1)
        rep.check(f"{tag}: weights rel err", rel(r.weights[keep], ref.weights[keep].detach()), 1e-4)
        rep.check(f"{tag}: probs rel err", rel(r.probs, ref.probs.detach()), 1e-4)
        rep.check(f"{tag}: aux rel err", rel(r.aux_loss, ref.aux_loss.detach()), 1e-3)
        rep.check(f"{tag}: z rel err", rel(r.z_loss, ref.z_loss.detach()), 1e-4)
        rep.check(f"{tag}: entropy rel err", rel(r.entropy_sum, ref.entropy_sum), 1e-4)
        counts_diff = (r.tokens_per_expert - ref.tokens_per_expert).abs().sum().item()
        rep.check(f"{tag}: count diff / mismatched", counts_diff / (2 * K * (~same).sum().item() + 1), 1.0)
        # Every kept pair appears once in the expert-sorted permutation, in its expert's rows.
        n = int(r.kept.sum())
        rows = r.row_pair[:n].long()
        starts = torch.cumsum(r.kept_per_expert, 0) - r.kept_per_expert
        row_expert = torch.repeat_interleave(torch.arange(E, device=DEV), r.kept_per_expert.long())
        ok = torch.equal(torch.sort(rows).values, torch.nonzero(r.kept.reshape(-1)).flatten())
        ok = ok and torch.equal(r.expert_indices.reshape(-1)[rows], row_expert) and int(starts[-1]) <= n
        rep.check(f"{tag}: permutation valid (0 = yes)", 0.0 if ok else 1.0, 0.0)
        # Backward against autograd of the same function in float32, on our discrete decisions
        # (top-k, kept and counts are piecewise constant, so this is the exact reference).
        G = torch.randn(T, K, device=DEV)
        w_ours = router.weight.detach().clone().requires_grad_(True)
        r = fused_route(x, w_ours, K, cf, 4, mask)
        ((r.weights * G).sum() + 0.3 * r.aux_loss + 0.1 * r.z_loss).backward()
        w_ref = router.weight.detach().clone().requires_grad_(True)
        logits = x_ref @ w_ref.t()
        probs = logits.softmax(-1)
        wts = probs.gather(1, r.expert_indices) * r.kept
        if K > 1:
            wts = wts / wts.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        valid = torch.ones(T, device=DEV) if mask is None else (~mask).float()
        denom = valid.sum().clamp_min(1)
        aux = E * ((probs * valid[:, None]).sum(0) / denom * r.tokens_per_expert / (denom * K)).sum()
        z = (torch.logsumexp(logits, -1).square() * valid).sum() / denom
        ((wts * G).sum() + 0.3 * aux + 0.1 * z).backward()
        rep.check(f"{tag}: dx rel err (bf16 grad)", rel(x.grad, x_ref.grad), 1e-2)
        rep.check(f"{tag}: dW rel err", rel(w_ours.grad, w_ref.grad), 1e-3)
        # Run to run: the same inputs give bitwise the same gradients (dW sums its token chunks in
        # a fixed order).
        grads = []
        for _ in range(2):
            xi = x.detach().clone().requires_grad_(True)
            wi = router.weight.detach().clone().requires_grad_(True)
            ri = fused_route(xi, wi, K, cf, 4, mask)
            ((ri.weights * G).sum() + 0.3 * ri.aux_loss + 0.1 * ri.z_loss).backward()
            grads.append((xi.grad, wi.grad))
        same_grads = torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        rep.check(f"{tag}: run-to-run bitwise dx, dW (0 = identical)", 0.0 if same_grads else 1.0, 0.0)
    # Random Token Selection: capacity respected, first choices keep priority, kept set random.
    T, H, E, K = sz(4096), sz(256), 8, 2
    w = torch.randn(E, H, device=DEV) * H**-0.5
    w[0] += 0.3  # over-full expert 0
    x = torch.randn(T, H, device=DEV, dtype=BF16)
    r1 = fused_route(x, w, K, 0.5, 4, random_priority=True)
    r2 = fused_route(x, w, K, 0.5, 4, random_priority=True)
    kept_e = torch.bincount(r1.expert_indices[r1.kept], minlength=E)
    rep.check("router RTS: max kept per expert / capacity", (kept_e.max() / r1.capacity).item(), 1.0)
    rep.check("router RTS: two draws differ (fraction)", (r1.kept != r2.kept).float().mean().item(), 1e-3, True)


def reference_experts(x, weights, kept, expert_indices, w1, w3, w2, activation):
    """float32 torch path: the dispatcher's permutation, the per-expert loop, the slot combine."""
    E = w1.shape[0]
    from lightning_moe.moe.router import RoutingResult

    routing = RoutingResult(expert_indices, weights, kept, None, None, None, None, None, None, None)
    disp = TokenDispatcher(E)
    rows, counts, _, state = disp.dispatch(x, routing)
    ex = GroupedExperts(E, x.shape[1], w1.shape[2], activation).to(x.device)
    del ex.w1, ex.w2, ex.w3
    ex.w1, ex.w2, ex.w3 = w1, w2, w3
    return disp.combine(ex(rows, counts), state)


def check_experts(rep: Report) -> None:
    cases = [
        # T, H, F, E, K, activation, capacity_factor, dtype, special
        (4096, 1024, 1536, 16, 2, "swiglu", 1.0, BF16, "zero-expert"),
        (2048, 512, 768, 8, 8, "swiglu", None, BF16, ""),
        (3001, 768, 1000, 32, 4, "gelu", None, BF16, ""),
        (2048, 1024, 512, 4, 1, "relu", 0.5, BF16, ""),
        (2048, 1024, 1024, 8, 2, "swiglu", 1.25, FP16, ""),
        (1000, 512, 512, 8, 1, "swiglu", None, BF16, "one-expert"),
    ]
    for T, H, F, E, K, act, cf, dtype, special in cases:
        T, H, F = sz(T), sz(H), sz(F)
        tag = f"experts T={T} H={H} F={F} E={E} K={K} {act} cf={cf} {str(dtype)[6:]} {special}"
        wg = torch.randn(E, H, device=DEV) * H**-0.5
        x32 = torch.randn(T, H, device=DEV)
        if special == "zero-expert":
            x32[:, 0] = x32[:, 0].abs() + 1
            wg[3, 0] = -30.0
        if special == "one-expert":
            x32[:, 0] = x32[:, 0].abs() + 1
            wg[5, 0] = 30.0
        x = x32.to(dtype)
        r = fused_route(x, wg, K, cf, 4)
        if special == "zero-expert":
            rep.check(f"{tag}: tokens on expert 3", r.tokens_per_expert[3].item(), 0.0)
        if special == "one-expert":
            rep.check(f"{tag}: tokens off expert 5", T - r.tokens_per_expert[5].item(), 0.0)
        w1 = torch.randn(E, H, F, device=DEV) * H**-0.5
        w3 = torch.randn(E, H, F, device=DEV) * H**-0.5 if act == "swiglu" else None
        w2 = torch.randn(E, F, H, device=DEV) * F**-0.5
        weights = r.weights.detach()
        dy = torch.randn(T, H, device=DEV)
        grads = []
        outs = []
        for _ in range(2):
            params = [p.clone().requires_grad_(True) if p is not None else None for p in (w1, w3, w2)]
            xw = x.clone().requires_grad_(True)
            ww = weights.clone().requires_grad_(True)
            poison()
            y = moe_experts(xw, ww, r.kept, r.row_pair, r.kept_per_expert, *params, act)
            poison()
            y.backward(dy.to(dtype))
            outs.append(y.detach())
            grads.append([xw.grad, ww.grad] + [p.grad if p is not None else None for p in params])
        params = [p.clone().requires_grad_(True) if p is not None else None for p in (w1, w3, w2)]
        x_ref = x.float().requires_grad_(True)
        w_ref = weights.clone().requires_grad_(True)
        y_ref = reference_experts(x_ref, w_ref, r.kept, r.expert_indices, *params, act)
        y_ref.backward(dy.to(dtype).float())
        rep.check(f"{tag}: y rel err", rel(outs[0], y_ref), 1e-2)
        names = ["dx", "dweights", "dw1", "dw3", "dw2"]
        ref_grads = [x_ref.grad, w_ref.grad] + [p.grad if p is not None else None for p in params]
        # ReLU's derivative is a step: rounding the weights to bf16 alone (float32 everywhere else)
        # moves dx and dW1 by 3.1e-2 at these sizes (checked on CPU), so its bound is wider.
        bound = 5e-2 if act == "relu" else 2e-2
        for name, g, gr in zip(names, grads[0], ref_grads, strict=True):
            if gr is not None:
                rep.check(f"{tag}: {name} rel err", rel(g, gr), bound)
        same = torch.equal(outs[0], outs[1]) and all(
            (a is None and b is None) or torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True)
        )
        rep.check(f"{tag}: run-to-run bitwise (0 = identical y, dx, dw, dW)", 0.0 if same else 1.0, 0.0)
    # Expert-parallel row mode on its own: contiguous rows, no gather/scatter.
    E, H, F, R = 8, sz(1024), sz(1024), sz(5000)
    counts = torch.randint(0, 2 * R // E, (E,), device=DEV)
    counts[2] = 0
    R = int(counts.sum())
    rows = torch.randn(R, H, device=DEV, dtype=BF16, requires_grad=True)
    ws = [torch.randn(E, H, F, device=DEV) * H**-0.5, None, torch.randn(E, F, H, device=DEV) * F**-0.5]
    ws[1] = torch.randn(E, H, F, device=DEV) * H**-0.5
    ps = [w.clone().requires_grad_(True) for w in ws]
    poison()
    out = grouped_ffn(rows, counts, ps[0], ps[1], ps[2], "swiglu")
    dout = torch.randn_like(out)
    out.backward(dout)
    ex = GroupedExperts(E, H, F, "swiglu").to(DEV)
    with torch.no_grad():
        ex.w1.copy_(ws[0])
        ex.w3.copy_(ws[1])
        ex.w2.copy_(ws[2])
    rows_ref = rows.detach().float().requires_grad_(True)
    out_ref = ex(rows_ref, counts)
    out_ref.backward(dout.float())
    rep.check("grouped_ffn rows: y rel err", rel(out, out_ref), 1e-2)
    rep.check("grouped_ffn rows: dx rel err", rel(rows.grad, rows_ref.grad), 2e-2)
    for p, n in zip(ps, ("w1", "w3", "w2"), strict=True):
        rep.check(f"grouped_ffn rows: d{n} rel err", rel(p.grad, getattr(ex, n).grad), 2e-2)


def check_layer(rep: Report) -> None:
    torch.manual_seed(int(time.time()))
    T, H, F, E, K = sz(4096), sz(1024), sz(2048), 8, 2
    moe = MoE(H, F, E, K, capacity_factor=1.25, random_token_selection=False, z_loss_weight=0.01, backend="triton")
    with torch.no_grad():
        moe.router.weight.normal_(std=H**-0.5)
    ours = moe.to(DEV).to(BF16)
    # The float32 reference starts from the same (bf16-representable) weights and inputs.
    ref = copy.deepcopy(ours).float()
    ref.backend = "torch"
    torch_bf16 = copy.deepcopy(ours)
    torch_bf16.backend = "torch"
    x = torch.randn(4, T // 4, H, device=DEV).to(BF16).float()
    dy = torch.randn_like(x)
    results = {}
    for name, m, dtype in (
        ("ref", ref, torch.float32),
        ("triton", ours, BF16),
        ("torch", torch_bf16, BF16),
    ):
        xi = x.detach().to(dtype).clone().requires_grad_(True)
        poison()
        y = m(xi)
        (y.float() * dy).sum().add(m.aux_loss.float()).backward()
        results[name] = (y.float(), xi.grad.float(), {n: p.grad.float() for n, p in m.named_parameters()}, m)
    y0, gx0, gp0, m0 = results["ref"]
    for name in ("triton", "torch"):
        y, gx, gp, m = results[name]
        rep.check(f"layer {name} bf16 vs fp32: y rel err", rel(y, y0), 2e-2)
        rep.check(f"layer {name} bf16 vs fp32: dx rel err", rel(gx, gx0), 3e-2)
        for n in gp0:
            rep.check(f"layer {name} bf16 vs fp32: d{n} rel err", rel(gp[n], gp0[n]), 3e-2)
        rep.check(f"layer {name}: aux rel err", rel(m.aux_loss.float(), m0.aux_loss), 1e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, world: int, port: int, out_dir: str, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not SMOKE:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if SMOKE else "nccl", rank=rank, world_size=world)
    T, H, F, E, K = sz(2048), sz(512), sz(1024), 8, 2
    results = {}
    for cf in (None, 1.0):
        torch.manual_seed(seed)
        moe = MoE(H, F, E, K, capacity_factor=cf, random_token_selection=False, backend="triton").to(DEV)
        with torch.no_grad():
            moe.router.weight.normal_(std=H**-0.5)
        moe = moe.to(BF16)
        ref = copy.deepcopy(moe).float()
        ref.backend = "torch"
        xs = [torch.randn(T + 37 * r, H, device=DEV).to(BF16).float() for r in range(world)]
        dys = [torch.randn_like(x).to(BF16).float() for x in xs]
        moe.shard_experts(ExpertParallelGroup(group=dist.group.WORLD, size=world, rank=rank))
        x = xs[rank].to(BF16).detach().clone().requires_grad_(True)
        y = moe(x)
        y.backward(dys[rank].to(BF16))
        # Reference: one process, every expert, each rank's tokens routed separately (float32).
        ys_ref = []
        for xr, dyr in zip(xs, dys, strict=True):
            xr = xr.detach().clone().requires_grad_(True)
            yr = ref(xr)
            yr.backward(dyr)
            ys_ref.append((yr.detach(), xr.grad))
        L = E // world
        sl = slice(rank * L, (rank + 1) * L)
        results[str(cf)] = {
            "y": rel(y.float(), ys_ref[rank][0]),
            "dx": rel(x.grad.float(), ys_ref[rank][1]),
            "dw1": rel(moe.experts.w1.grad.float(), ref.experts.w1.grad[sl]),
            "dw2": rel(moe.experts.w2.grad.float(), ref.experts.w2.grad[sl]),
            "dw3": rel(moe.experts.w3.grad.float(), ref.experts.w3.grad[sl]),
        }
    with open(os.path.join(out_dir, f"ep_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def check_expert_parallel(rep: Report, out_dir: str) -> None:
    if not SMOKE and torch.cuda.device_count() < 2:
        print("skip expert-parallel check: fewer than 2 GPUs", flush=True)
        return
    mp.spawn(_ep_worker, args=(2, _free_port(), out_dir, int(time.time())), nprocs=2, join=True)
    for rank in range(2):
        with open(os.path.join(out_dir, f"ep_rank{rank}.json")) as f:
            res = json.load(f)
        os.remove(os.path.join(out_dir, f"ep_rank{rank}.json"))
        for cf, vals in res.items():
            for name, v in vals.items():
                # Local expert gradients pick up the all-to-all'd bf16 rows of both ranks.
                rep.check(f"EP=2 rank{rank} cf={cf} triton bf16 vs fp32 1-process: {name} rel err", v, 3e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-ep", action="store_true")
    parser.add_argument("--only", default="router,experts,layer", help="comma-separated subset of the checks")
    parser.add_argument("--cpu-smoke", action="store_true", help="small float32 run under TRITON_INTERPRET=1")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    name = "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"torch {torch.__version__} triton {triton.__version__} {name}", flush=True)
    rep = Report()
    t0 = time.time()
    checks = {"router": check_router, "experts": check_experts, "layer": check_layer}
    for fn in [checks[name] for name in args.only.split(",") if name]:
        try:
            fn(rep)
        except Exception:
            traceback.print_exc()
            rep.rows.append({"check": fn.__name__, "value": float("nan"), "bound": 0, "ok": False, "error": True})
        print(f"-- {fn.__name__} done at {time.time() - t0:.1f}s", flush=True)
    if not args.skip_ep:
        try:
            check_expert_parallel(rep, args.out)
        except Exception:
            traceback.print_exc()
            rep.rows.append({"check": "expert_parallel", "value": float("nan"), "bound": 0, "ok": False})
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(rep.rows, f, indent=1)
    failed = [r for r in rep.rows if not r["ok"]]
    print(f"gpu_check: {len(rep.rows) - len(failed)}/{len(rep.rows)} checks passed in {time.time() - t0:.0f}s")
    for r in failed:
        print(f"FAILED: {r['check']} value={r['value']}")


if __name__ == "__main__":
    main()
