"""The MoE layer against independent formulations written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoE
from lightning_moe.moe import compute_capacity


def gshard_routing(probs_TE: torch.Tensor, top_k: int, capacity: int | None):
    """One-hot GShard/DeepSpeed formulation: per choice level, cumsum positions, offset by earlier levels."""
    T, E = probs_TE.shape
    top_p, idx = probs_TE.topk(top_k, dim=-1)
    kept = torch.zeros(T, top_k, dtype=torch.bool)
    used_E = torch.zeros(E, dtype=torch.long)
    for j in range(top_k):
        mask_TE = F.one_hot(idx[:, j], E)
        loc_TE = torch.cumsum(mask_TE, 0) - 1 + used_E[None, :]
        loc_T = (loc_TE * mask_TE).sum(-1)
        kept[:, j] = True if capacity is None else loc_T < capacity
        used_E += mask_TE.sum(0)
    w = top_p * kept
    if top_k > 1:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    return idx, w, kept


def make(num_experts=4, top_k=2, hidden=8, ffn=12, **kw):
    kw.setdefault("random_token_selection", False)
    return MoE(hidden_size=hidden, ffn_hidden_size=ffn, num_experts=num_experts, top_k=top_k, **kw)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
def test_routing_matches_one_hot_gshard(top_k, capacity_factor):
    torch.manual_seed(top_k * 7 + int((capacity_factor or 0) * 10))
    moe = make(num_experts=6, top_k=top_k, capacity_factor=capacity_factor, min_capacity=1)
    # Skew the router so that some experts overflow.
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(37, 8)
    r = moe.router(x)
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    cap = None if capacity_factor is None else max(1, math.ceil(37 * top_k / 6 * capacity_factor))
    idx, w, kept = gshard_routing(probs, top_k, cap)
    assert r.capacity == cap
    assert torch.equal(r.expert_indices, idx)
    assert torch.equal(r.kept, kept)
    torch.testing.assert_close(r.weights, w)
    expected_counts = torch.bincount(idx.reshape(-1), minlength=6).float()
    assert torch.equal(r.tokens_per_expert, expected_counts)
    if capacity_factor == 0.5:
        assert not kept.all(), "the test should exercise drops"
    # Output equals the naive per-token mixture with these weights.
    y = moe(x)
    ref = moe.reference_forward(x, w, idx)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_aux_and_z_loss_hand_computed():
    torch.manual_seed(0)
    moe = make(num_experts=4, top_k=1, capacity_factor=None, aux_loss_weight=0.5, z_loss_weight=0.25)
    x = torch.randn(10, 8)
    r = moe.router(x)
    logits = x @ moe.router.weight.t()
    probs = logits.softmax(-1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 10
    aux = 4 * (probs.mean(0) * frac).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(r.aux_loss, aux)
    torch.testing.assert_close(r.z_loss, z)
    moe(x)
    torch.testing.assert_close(moe.aux_loss, 0.5 * aux + 0.25 * z)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_equals_naive_mixture(activation, top_k):
    torch.manual_seed(1)
    moe = make(num_experts=5, top_k=top_k, capacity_factor=None, activation=activation)
    x = torch.randn(3, 7, 8)
    y = moe(x)
    flat = x.reshape(-1, 8)
    probs = torch.softmax(flat @ moe.router.weight.t(), -1)
    top_p, idx = probs.topk(top_k, -1)
    w = top_p if top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(top_k):
            ref[t] += w[t, k] * moe.experts.expert_forward(int(idx[t, k]), flat[t : t + 1])[0]
    torch.testing.assert_close(y.reshape(-1, 8), ref, rtol=1e-5, atol=1e-5)
    assert moe.last_stats.dropped.item() == 0


def test_rts_unbiased_and_capacity_respected():
    torch.manual_seed(123)
    T, E = 64, 4
    moe = make(
        num_experts=E, top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1,
        random_token_selection=True,
    )  # fmt: skip
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[:, 0] > 0 prefers expert 0
    x = torch.randn(T, 8)
    x[:, 0] = 1.0 + x[:, 0].abs()  # all tokens go to expert 0: it is over-full 4x
    cap = compute_capacity(T, E, 1, 1.0, 1)
    moe.train()
    position_sum = 0.0
    rounds = 200
    kept_counts = torch.zeros(T)
    for _ in range(rounds):
        r = moe.router(x)
        assert (r.expert_indices[:, 0] == 0).all()
        assert int(r.kept.sum()) == cap  # never over capacity, and fills it
        kept_pos = torch.nonzero(r.kept[:, 0]).flatten().float()
        position_sum += kept_pos.mean().item()
        kept_counts += r.kept[:, 0].float()
    # Token order would keep positions 0..cap-1 (mean (cap-1)/2 = 7.5); uniform gives (T-1)/2 = 31.5.
    mean_pos = position_sum / rounds
    sd = math.sqrt((T**2 - 1) / 12 / cap * (T - cap) / (T - 1)) / math.sqrt(rounds)
    assert abs(mean_pos - (T - 1) / 2) < 4 * sd
    # Every token is kept at about the rate cap / T; early tokens are not favoured.
    first_half = kept_counts[: T // 2].sum()
    second_half = kept_counts[T // 2 :].sum()
    assert abs(first_half - second_half) < 0.15 * (first_half + second_half)
    # Eval mode with a capacity factor is deterministic token order.
    moe.eval()
    r = moe.router(x)
    assert torch.equal(torch.nonzero(r.kept[:, 0]).flatten(), torch.arange(cap))


@pytest.mark.parametrize("top_k", [2, 3])
def test_rts_respects_capacity_topk(top_k):
    torch.manual_seed(5)
    moe = make(num_experts=4, top_k=top_k, capacity_factor=0.5, min_capacity=1, random_token_selection=True)
    with torch.no_grad():
        moe.router.weight.normal_(std=2.0)
    x = torch.randn(50, 8)
    r = moe.router(x)
    kept_per_e = torch.bincount(r.expert_indices[r.kept], minlength=4)
    assert (kept_per_e <= r.capacity).all()
    # First choices keep their priority: an expert drops a first choice only if it is full of first choices.
    for e in range(4):
        first_dropped = ((r.expert_indices[:, 0] == e) & ~r.kept[:, 0]).any()
        if first_dropped:
            later_kept = ((r.expert_indices[:, 1:] == e) & r.kept[:, 1:]).any()
            assert not later_kept


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_float64(capacity_factor, top_k):
    torch.manual_seed(2)
    moe = make(
        num_experts=3,
        top_k=top_k,
        hidden=4,
        ffn=5,
        capacity_factor=capacity_factor,
        min_capacity=1,
        aux_loss_weight=0.1,
        z_loss_weight=0.01,
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    params = [moe.router.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3]

    # Parameters re-bound as inputs so gradcheck perturbs them.
    inputs = [x] + [p.detach().clone().requires_grad_(True) for p in params]

    def g(x, wg, w1, w2, w3):
        del moe.router.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3
        moe.router.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3 = wg, w1, w2, w3
        y = moe(x)
        return y, moe.aux_loss

    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-5)


def test_edge_cases():
    torch.manual_seed(3)
    moe = make(num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=1)
    # T smaller than E, and T = 1.
    for T in (3, 1):
        x = torch.randn(T, 8)
        y = moe(x)
        assert y.shape == (T, 8) and torch.isfinite(y).all()
    # All tokens on one expert (top-1): capacity drops the rest; zero-token experts are fine.
    moe1 = make(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        moe1.router.weight.zero_()
        moe1.router.weight[2, 0] = 20.0
    x = torch.randn(16, 8)
    x[:, 0] = x[:, 0].abs() + 1
    y = moe1(x)
    r = moe1.router(x)
    assert (r.expert_indices[:, 0] == 2).all()
    assert int(r.kept.sum()) == compute_capacity(16, 4, 1, 1.0, 1) == 4
    assert torch.equal(moe1.last_stats.tokens_per_expert, torch.tensor([0.0, 0.0, 16.0, 0.0]))
    assert moe1.last_stats.dropped.item() == 12
    dropped_rows = ~r.kept[:, 0]
    assert torch.equal(y[dropped_rows], torch.zeros_like(y[dropped_rows]))
    ref = moe1.reference_forward(x, r.weights, r.expert_indices)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # Dropless with every token on one expert.
    moe1.router.capacity_factor = None
    y = moe1(x)
    ref = moe1.reference_forward(x, moe1.router(x).weights, moe1.router(x).expert_indices)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_padding_everywhere_but_one():
    torch.manual_seed(4)
    moe = make(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    y = moe(x, padding_mask=mask)
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    single = moe(x[1, 3][None])
    torch.testing.assert_close(y[1, 3], single[0], rtol=1e-5, atol=1e-6)
    s = moe.last_stats
    moe(x, padding_mask=mask)
    s = moe.last_stats
    assert s.num_tokens.item() == 1 and s.tokens_per_expert.sum().item() == 2


def test_shared_experts_added():
    torch.manual_seed(6)
    moe = make(num_experts=4, top_k=1, capacity_factor=None, num_shared_experts=2)
    x = torch.randn(5, 8)
    y = moe(x)
    shared = moe.shared_experts.expert_forward(0, x)
    moe_only = y - shared
    r = moe.router(x)
    torch.testing.assert_close(moe_only, moe.reference_forward(x, r.weights, r.expert_indices), rtol=1e-5, atol=1e-5)
    assert moe.shared_experts.w1.shape == (1, 8, 24)


def test_dtypes_and_autocast():
    torch.manual_seed(7)
    moe = make(num_experts=4, top_k=2, capacity_factor=None)
    x = torch.randn(2, 6, 8)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        r = moe.router(x.reshape(-1, 8))
    assert y.dtype == torch.float32
    assert r.weights.dtype == torch.float32  # router math stays fp32
    assert (y - ref).norm() / ref.norm() < 2e-2
    moe64 = make(num_experts=4, top_k=2, capacity_factor=None).double()
    assert moe64(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 5, "num_experts": 4}, "top_k=5"),
        ({"num_experts": 0, "top_k": 1}, "num_experts=0"),
        ({"capacity_factor": -1.0}, "capacity_factor=-1.0"),
        ({"eval_capacity_factor": 0.0}, "eval_capacity_factor=0.0"),
        ({"activation": "tanh"}, "activation='tanh'"),
        ({"backend": "cuda"}, "backend='cuda'"),
    ],
)
def test_bad_configuration(kwargs, match):
    base = {"hidden_size": 8, "ffn_hidden_size": 8, "num_experts": 4, "top_k": 2}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoE(**base)


def test_wrong_hidden_size_at_forward():
    moe = make()
    with pytest.raises(ValueError, match="hidden_size=8"):
        moe(torch.randn(3, 9))
    with pytest.raises(ValueError, match="padding_mask"):
        moe(torch.randn(3, 8), padding_mask=torch.zeros(4, dtype=torch.bool))


def test_eval_is_dropless_by_default_and_independent_of_the_batch():
    torch.manual_seed(3)
    moe = make(num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=1)
    with torch.no_grad():
        moe.router.weight.normal_(std=3.0)
    x = torch.randn(48, 8)
    moe.train()
    moe(x)
    assert moe.last_stats.dropped.item() > 0  # training drops at capacity factor 0.5
    moe.eval()
    with torch.no_grad():
        batch = moe(x)
        assert moe.last_stats.dropped.item() == 0
        alone = moe(x[:5])  # the same tokens without their batch neighbours
        reference = moe.reference_forward(x, *_router_weights_and_indices(moe, x))
    torch.testing.assert_close(batch[:5], alone)
    torch.testing.assert_close(batch, reference)
    # An explicit eval capacity factor brings capacity-mode evaluation back.
    moe.router.eval_capacity_factor = 0.5
    with torch.no_grad():
        moe(x)
    assert moe.last_stats.dropped.item() > 0


def _router_weights_and_indices(moe, x):
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    top, idx = probs.topk(moe.top_k, dim=-1)
    return top / top.sum(-1, keepdim=True), idx


def test_eval_capacity_factor_and_stats():
    torch.manual_seed(8)
    moe = make(num_experts=4, top_k=1, capacity_factor=0.5, eval_capacity_factor=4.0, min_capacity=1)
    with torch.no_grad():
        moe.router.weight.normal_(std=3.0)
    x = torch.randn(40, 8)
    moe.train()
    moe(x)
    train_dropped = moe.last_stats.dropped.item()
    moe.eval()
    moe(x)
    assert moe.last_stats.dropped.item() == 0 < train_dropped
    s = moe.last_stats
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    ent = -(probs * probs.log()).sum()
    torch.testing.assert_close(s.router_entropy_sum, ent)
    assert s.num_tokens.item() == 40
