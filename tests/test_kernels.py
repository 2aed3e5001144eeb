"""Triton kernels under TRITON_INTERPRET=1 (CPU, float32, small sizes) against the torch reference.

Every test draws fresh random inputs. The GPU counterpart (bf16 against float32, determinism,
expert parallelism over NCCL) is benchmarks/gpu_check.py.
"""

import copy
import os
import re
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe import MoE
from lightning_moe.moe import ExpertParallelGroup, GroupedExperts, Router, RoutingResult, TokenDispatcher

pytest.importorskip("triton")

# triton.jit picks the interpreter when a function is decorated, Triton's own library included, so
# TRITON_INTERPRET=1 must be set before anything imports triton (``import lightning`` does). The
# kernel tests therefore run in a child pytest that starts with it set; in a process that was
# started with TRITON_INTERPRET=1 they run directly.
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child pytest")


def test_kernels_under_interpreter():
    if IN_INTERPRETER:
        pytest.skip("this process already runs the kernel tests")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout.strip().splitlines()[-1])
    assert passed and int(passed.group(1)) >= 14, proc.stdout[-2000:]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_router(H, E, K, cf, skew=1.0):
    router = Router(H, E, K, capacity_factor=cf, min_capacity=1, random_token_selection=False)
    with torch.no_grad():
        router.weight.normal_(std=skew)
    return router


@kernel_test
@pytest.mark.parametrize(
    ("T", "E", "K", "cf", "pad"),
    [
        (37, 6, 1, 0.5, False),
        (70, 6, 2, 1.0, True),
        (33, 8, 8, None, False),
        (45, 5, 3, 1.25, True),
        (300, 7, 2, 1.0, False),  # dW summed over 3 token chunks, the last one partial
    ],
)
def test_router_matches_reference(T, E, K, cf, pad):
    from lightning_moe.kernels.router import fused_route

    H = 24
    router = make_router(H, E, K, cf)
    x = torch.randn(T, H, requires_grad=True)
    mask = torch.rand(T) < 0.2 if pad else None
    w = router.weight.detach().clone().requires_grad_(True)
    r = fused_route(x, w, K, cf, min_capacity=1, padding_mask_T=mask)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = router(x_ref, mask)
    assert r.capacity == ref.capacity
    assert torch.equal(r.expert_indices, ref.expert_indices)
    assert torch.equal(r.kept, ref.kept)
    if cf == 0.5:
        assert not r.kept.all(), "the case should drop"
    torch.testing.assert_close(r.weights, ref.weights)
    torch.testing.assert_close(r.probs, ref.probs)
    assert torch.equal(r.tokens_per_expert, ref.tokens_per_expert)
    for name in ("aux_loss", "z_loss", "entropy_sum", "num_tokens"):
        torch.testing.assert_close(getattr(r, name), getattr(ref, name).float())
    # The expert-sorted permutation: each expert's kept pairs, in slot (priority) order.
    n = int(r.kept.sum())
    assert int(r.kept_per_expert.sum()) == n
    start = 0
    for e, count in enumerate(r.kept_per_expert.tolist()):
        pairs = r.row_pair[start : start + count].long()
        t, k = pairs // K, pairs % K
        assert (r.expert_indices[t, k] == e).all() and r.kept[t, k].all()
        assert torch.equal(k * T + t, torch.sort(k * T + t).values), "slot order is level, then token"
        start += count
    # Backward through weights, aux and z-loss.
    G = torch.randn(T, K)
    (r.weights * G).sum().add(0.3 * r.aux_loss + 0.2 * r.z_loss).backward()
    (ref.weights * G).sum().add(0.3 * ref.aux_loss + 0.2 * ref.z_loss).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, router.weight.grad, rtol=1e-4, atol=1e-6)


@kernel_test
def test_router_half_precision_split():
    """16-bit x: logits and dx/dW from 16-bit halves of the float32 operands (float16 here)."""
    from lightning_moe.kernels.router import fused_route

    T, H, E, K = 50, 32, 6, 2
    router = make_router(H, E, K, 1.0)
    x = torch.randn(T, H).half().requires_grad_(True)
    w = router.weight.detach().clone().requires_grad_(True)
    r = fused_route(x, w, K, 1.0, min_capacity=1)
    x_ref = x.detach().float().requires_grad_(True)
    ref = router(x_ref)
    assert torch.equal(r.expert_indices, ref.expert_indices) and torch.equal(r.kept, ref.kept)
    torch.testing.assert_close(r.probs, ref.probs, rtol=1e-4, atol=1e-6)
    G = torch.randn(T, K)
    (r.weights * G).sum().add(r.aux_loss + r.z_loss).backward()
    (ref.weights * G).sum().add(ref.aux_loss + ref.z_loss).backward()
    assert rel(x.grad, x_ref.grad) < 2e-3
    assert rel(w.grad, router.weight.grad) < 1e-4


@kernel_test
def test_rts_permutation_is_a_uniform_permutation():
    from lightning_moe.kernels.router import rts_permutation

    for T in (1, 2, 3, 17, 64, 100, 1000, 4097):  # the Feistel domain is 4^h >= T; cycle-walk the rest
        p = rts_permutation(T, tuple(torch.randint(0, 2**31 - 1, (4,)).tolist()))
        assert torch.equal(p.sort().values, torch.arange(T)), T
    # Over random keys, every token is equally likely at every priority: the mean priority of each
    # token is (T - 1) / 2 = 31.5, standard deviation 18.5 / sqrt(400) = 0.92 per token (token
    # order would give means 0..63).
    T, rounds = 64, 400
    pos = torch.zeros(T)
    first_before_second = 0
    for _ in range(rounds):
        p = rts_permutation(T, tuple(torch.randint(0, 2**31 - 1, (4,)).tolist()))
        inv = torch.empty_like(p)
        inv[p] = torch.arange(T)
        pos += inv
        first_before_second += int(inv[0] < inv[1])
    assert (pos / rounds - 31.5).abs().max() < 4.5
    assert abs(first_before_second / rounds - 0.5) < 0.1  # 4 sigma


@kernel_test
def test_router_random_token_selection():
    from lightning_moe.kernels.router import fused_route

    T, H, E, K = 64, 16, 4, 2
    w = torch.randn(E, H)
    x = torch.randn(T, H)
    draws = [fused_route(x, w, K, 0.5, min_capacity=1, random_priority=True) for _ in range(2)]
    for r in draws:
        kept_e = torch.bincount(r.expert_indices[r.kept], minlength=E)
        assert (kept_e <= r.capacity).all()
        assert torch.equal(kept_e.int(), r.kept_per_expert)
        for e in range(E):  # an expert drops a first choice only if full of first choices
            if ((r.expert_indices[:, 0] == e) & ~r.kept[:, 0]).any():
                assert not ((r.expert_indices[:, 1:] == e) & r.kept[:, 1:]).any()
    assert not torch.equal(draws[0].kept, draws[1].kept)
    # Without RTS the kept set is the token-order one, as in the reference.
    ref = Router(H, E, K, capacity_factor=0.5, min_capacity=1, random_token_selection=False)
    with torch.no_grad():
        ref.weight.copy_(w)
    assert torch.equal(fused_route(x, w, K, 0.5, min_capacity=1).kept, ref(x).kept)


def reference_experts(x, weights, kept, expert_indices, w1, w3, w2, activation):
    E = w1.shape[0]
    routing = RoutingResult(expert_indices, weights, kept, None, None, None, None, None, None, None)
    disp = TokenDispatcher(E)
    rows, counts, _, state = disp.dispatch(x, routing)
    ex = GroupedExperts(E, x.shape[1], w1.shape[2], activation)
    del ex.w1, ex.w2, ex.w3
    ex.w1, ex.w2, ex.w3 = w1, w2, w3
    return disp.combine(ex(rows, counts), state)


@kernel_test
@pytest.mark.parametrize(
    ("T", "H", "F", "E", "K", "activation", "cf", "special"),
    [
        (37, 24, 20, 6, 2, "swiglu", 1.0, "zero-expert"),  # H, F, T*K not multiples of the blocks
        (21, 16, 32, 8, 8, "swiglu", None, ""),  # k = 8
        (40, 32, 16, 4, 1, "swiglu", None, "one-expert"),
        (29, 16, 24, 5, 3, "gelu", 0.5, ""),
        (30, 16, 16, 4, 2, "relu", None, ""),
    ],
)
def test_fused_experts_match_reference(T, H, F, E, K, activation, cf, special):
    from lightning_moe.kernels.moe_ffn import moe_experts
    from lightning_moe.kernels.router import fused_route

    x = torch.randn(T, H)
    wg = torch.randn(E, H)
    if special:
        x[:, 0] = x[:, 0].abs() + 1
        wg[3 if special == "zero-expert" else 1, 0] = -30.0 if special == "zero-expert" else 30.0
    r = fused_route(x, wg, K, cf, min_capacity=1)
    if special == "zero-expert":
        assert r.tokens_per_expert[3] == 0
    if special == "one-expert":
        assert r.tokens_per_expert[1] == T
    w1 = torch.randn(E, H, F) * H**-0.5
    w3 = torch.randn(E, H, F) * H**-0.5 if activation == "swiglu" else None
    w2 = torch.randn(E, F, H) * F**-0.5
    dy = torch.randn(T, H)
    results = []
    for impl in ("triton", "torch"):
        xi = x.clone().requires_grad_(True)
        wi = r.weights.detach().clone().requires_grad_(True)
        params = [p.clone().requires_grad_(True) if p is not None else None for p in (w1, w3, w2)]
        if impl == "triton":
            y = moe_experts(xi, wi, r.kept, r.row_pair, r.kept_per_expert, *params, activation)
        else:
            y = reference_experts(xi, wi, r.kept, r.expert_indices, *params, activation)
        y.backward(dy)
        results.append([y, xi.grad, wi.grad] + [p.grad if p is not None else None for p in params])
    for name, a, b in zip(["y", "dx", "dweights", "dw1", "dw3", "dw2"], *results, strict=True):
        if b is not None:
            assert rel(a, b) < 1e-5, name


@kernel_test
def test_gather_rows_writes_the_kept_rows_only():
    from lightning_moe.kernels.grouped_gemm import gather_rows

    T, K, H = 23, 3, 40  # H not a multiple of the column block
    src = torch.randn(T, H)
    scale = torch.rand(T * K)
    counts = torch.tensor([7, 0, 30, 11], dtype=torch.int32)  # 48 of 69 pairs kept
    n = int(counts.sum())
    row_pair = torch.randperm(T * K).to(torch.int32)
    for s in (None, scale):
        out = gather_rows(src, row_pair, K, counts, T * K, scale=s)
        pairs = row_pair[:n].long()
        expect = src[pairs // K] * (1.0 if s is None else s[pairs, None])
        torch.testing.assert_close(out[:n], expect, rtol=0, atol=0)
    assert gather_rows(src, row_pair, K, torch.zeros(4, dtype=torch.int32), 0).shape == (0, H)


@kernel_test
def test_grouped_ffn_rows_and_determinism():
    from lightning_moe.kernels.moe_ffn import grouped_ffn

    E, H, F = 4, 16, 24
    counts = torch.tensor([5, 0, 17, 9])
    rows = torch.randn(int(counts.sum()), H)
    ex = GroupedExperts(E, H, F, "swiglu")
    dout = torch.randn_like(rows)
    grads = []
    for _ in range(2):
        r = rows.clone().requires_grad_(True)
        ps = [p.detach().clone().requires_grad_(True) for p in (ex.w1, ex.w3, ex.w2)]
        out = grouped_ffn(r, counts, *ps, "swiglu")
        out.backward(dout)
        grads.append([out, r.grad] + [p.grad for p in ps])
    r_ref = rows.clone().requires_grad_(True)
    out_ref = ex(r_ref, counts)
    out_ref.backward(dout)
    refs = [out_ref, r_ref.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad]
    for a, b in zip(grads[0], refs, strict=True):
        assert rel(a, b) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True)), "run-to-run bitwise"
    assert torch.equal(grads[0][3][1], torch.zeros(H, F)), "an expert with no rows gets a zero gradient"


@kernel_test
@pytest.mark.parametrize(("activation", "K", "cf", "pad"), [("swiglu", 2, 1.0, True), ("gelu", 1, None, False)])
def test_moe_layer_triton_backend_matches_torch(activation, K, cf, pad):
    torch.manual_seed(0)
    moe = MoE(16, 24, 5, K, capacity_factor=cf, min_capacity=1, random_token_selection=False, activation=activation)
    moe.z_loss_weight = 0.1
    with torch.no_grad():
        moe.router.weight.normal_()
    ref = copy.deepcopy(moe)
    moe.backend, ref.backend = "triton", "torch"
    x = torch.randn(3, 11, 16)
    mask = torch.rand(3, 11) < 0.2 if pad else None
    dy = torch.randn(3, 11, 16)
    outs = []
    for m in (moe, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi, padding_mask=mask)
        ((y * dy).sum() + m.aux_loss).backward()
        outs.append((y, xi.grad, m.aux_loss, m.last_stats, {n: p.grad for n, p in m.named_parameters()}))
    (y, gx, aux, stats, gp), (y_r, gx_r, aux_r, stats_r, gp_r) = outs
    assert rel(y, y_r) < 1e-5 and rel(gx, gx_r) < 1e-5
    torch.testing.assert_close(aux, aux_r)
    for name in gp_r:
        assert rel(gp[name], gp_r[name]) < 1e-5, name
    for field in ("tokens_per_expert", "kept_per_expert", "num_tokens", "dropped"):
        assert torch.equal(getattr(stats, field), getattr(stats_r, field)), field
    if mask is not None:
        assert (y[mask] == 0).all()


@kernel_test
def test_plain_routing_result_and_fallbacks(monkeypatch):
    from lightning_moe import kernels
    from lightning_moe.kernels import availability

    torch.manual_seed(1)
    moe = MoE(16, 24, 4, 2, capacity_factor=1.0, min_capacity=1, random_token_selection=False, backend="triton")
    x = torch.randn(20, 16)
    ref = copy.deepcopy(moe)
    ref.backend = "torch"
    # A routing from the torch router (no fused permutation) still runs the fused experts.
    routing = moe.router(x)
    y, kept_E = kernels.triton_moe_experts(moe, x, routing)
    y_ref = ref(x)
    assert rel(y, y_ref) < 1e-5
    assert torch.equal(kept_E.float(), ref.last_stats.kept_per_expert)
    # float64 has no kernel: the torch path runs.
    assert not kernels.triton_available(torch.device("cpu"), dtype=torch.float64)
    # Without the interpreter (or without Triton) on CPU: a warning, then the torch backend.
    for attr, value in (("interpreter_enabled", lambda: False), ("_triton_installed", lambda: False)):
        with monkeypatch.context() as m:
            m.setattr(availability, attr, value)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y2 = moe(x)
            assert any("using the torch backend" in str(w.message) for w in caught)
            torch.testing.assert_close(y2, y_ref)


def test_works_without_triton():
    """With Triton absent, the kernels package imports and backend="triton" warns and runs torch."""
    code = (
        "import sys, warnings, torch; sys.modules['triton'] = None\n"
        "from lightning_moe.moe import MoE\n"
        "import lightning_moe.kernels as k\n"
        "assert not k.triton_available(torch.device('cpu'))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = MoE(8, 16, 4, 2, backend='triton')(torch.randn(3, 8))\n"
        "assert y.shape == (3, 8) and any('triton is not installed' in str(m.message) for m in w)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    moe = MoE(16, 12, 4, 2, capacity_factor=1.0, min_capacity=1, random_token_selection=False, backend="triton")
    with torch.no_grad():
        moe.router.weight.normal_()
    ref = copy.deepcopy(moe)
    ref.backend = "torch"
    xs = [torch.randn(13, 16), torch.randn(9, 16)]
    moe.shard_experts(ExpertParallelGroup(group=dist.group.WORLD, size=world, rank=rank))
    x = xs[rank].clone().requires_grad_(True)
    y = moe(x)
    y.backward(torch.ones_like(y))
    for xr in xs:  # one process, every expert, each rank's tokens routed on their own
        ref(xr).backward(torch.ones(xr.shape[0], 16))
    x_ref = xs[rank].clone().requires_grad_(True)
    y_ref = ref(x_ref)
    sl = slice(rank * 2, rank * 2 + 2)
    torch.save(
        {
            "y": rel(y, y_ref),
            "w1": rel(moe.experts.w1.grad, ref.experts.w1.grad[sl]),
            "w2": rel(moe.experts.w2.grad, ref.experts.w2.grad[sl]),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


@kernel_test
def test_expert_parallel_triton_path(tmp_path):
    mp.spawn(_ep_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errs = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(v < 1e-5 for v in errs.values()), errs
