"""Router options of the published families against transformers' routers, and aux-loss-free balancing."""

import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn

from lightning_moe import MoE
from lightning_moe.callbacks import ExpertBiasUpdate
from lightning_moe.models import GPT, GPTConfig
from lightning_moe.moe import Router, update_expert_biases

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _router(E=8, H=16, K=2, **kw):
    torch.manual_seed(0)
    router = Router(H, E, K, capacity_factor=None, random_token_selection=False, **kw)
    with torch.no_grad():
        router.weight.normal_()
    return router


def _sorted(idx_TK, w_TK):
    order = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order), w_TK.gather(1, order)


@pytest.mark.parametrize(("module", "normalize"), [("mixtral", True), ("qwen2_moe", False), ("olmoe", False)])
def test_softmax_top_k_with_and_without_renormalisation_match_transformers(module, normalize):
    import transformers as tf

    cfg = {
        "mixtral": tf.MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        "olmoe": tf.OlmoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    }[module]
    ref_cls = {
        "mixtral": tf.models.mixtral.modeling_mixtral.MixtralTopKRouter,
        "qwen2_moe": tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter,
        "olmoe": tf.models.olmoe.modeling_olmoe.OlmoeTopKRouter,
    }[module]
    router = _router(normalize_top_k=normalize)
    ref = ref_cls(cfg)
    ref.weight.data.copy_(router.weight.data)
    x = torch.randn(50, 16)
    _, ref_w, ref_idx = ref(x)
    out = router(x)
    idx, w = _sorted(out.expert_indices, out.weights)
    ridx, rw = _sorted(ref_idx, ref_w)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw.float(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(out.weights.sum(-1), torch.ones(50)) == normalize


@pytest.mark.parametrize(("groups", "top_groups"), [(4, 2), (1, None), (2, 1)])
def test_sigmoid_bias_and_group_limited_top_k_match_deepseek_v3(groups, top_groups):
    import transformers as tf
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, K = 8, 2
    cfg = tf.DeepseekV3Config(
        hidden_size=16, n_routed_experts=E, num_experts_per_tok=K, n_group=groups, topk_group=top_groups or groups,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    router = _router(
        E=E, K=K, score_function="sigmoid", normalize_top_k=True, routed_scaling_factor=2.5, expert_groups=groups,
        top_groups=top_groups, expert_bias=True,
    )  # fmt: skip
    with torch.no_grad():
        router.expert_bias.normal_(0, 0.5)  # large enough to change selections
    ref = DeepseekV3TopkRouter(cfg)
    ref.weight.data.copy_(router.weight.data)
    ref.e_score_correction_bias.copy_(router.expert_bias)
    x = torch.randn(64, 16)
    _, ref_w, ref_idx = ref(x)
    out = router(x)
    idx, w = _sorted(out.expert_indices, out.weights)
    ridx, rw = _sorted(ref_idx, ref_w)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)
    # the bias steers selection only: weights are the unbiased sigmoid scores, renormalised and scaled
    scores = torch.sigmoid(x @ router.weight.t()).gather(1, out.expert_indices)
    torch.testing.assert_close(out.weights, 2.5 * scores / scores.sum(-1, keepdim=True))
    if groups > 1 and top_groups is not None and top_groups < groups:
        groups_used = (out.expert_indices // (E // groups)).unique(dim=None)
        per_token = [(out.expert_indices[t] // (E // groups)).unique().numel() for t in range(64)]
        assert max(per_token) <= top_groups and groups_used.numel() > top_groups


def test_defaults_keep_gshard_rule_and_explicit_renormalisation_changes_top_1():
    x = torch.randn(40, 16)
    default, explicit = _router(K=1), _router(K=1, normalize_top_k=True)
    d, e = default(x), explicit(x)
    assert torch.equal(d.expert_indices, e.expert_indices)
    torch.testing.assert_close(d.weights[:, 0], torch.softmax(x @ default.weight.t(), -1).max(-1).values)
    torch.testing.assert_close(e.weights, torch.ones(40, 1))
    assert default.fused_supported and not explicit.fused_supported
    assert _router(K=2, normalize_top_k=True).fused_supported  # same as the default rule for K >= 2


def test_invalid_router_options_are_named():
    with pytest.raises(ValueError, match="score_function='tanh'"):
        Router(8, 8, 2, score_function="tanh")
    with pytest.raises(ValueError, match="expert_groups=3"):
        Router(8, 8, 2, expert_groups=3)
    with pytest.raises(ValueError, match="raise top_groups to at least 2"):
        Router(8, 8, 4, expert_groups=4, top_groups=1)
    with pytest.raises(ValueError, match="set expert_bias=True"):
        Router(8, 8, 2, bias_update_rate=1e-3)
    with pytest.raises(ValueError, match="bias_update_rate"):
        GPTConfig(vocab_size=10, d_model=8, n_heads=2, d_ff=8, n_layers=2, bias_update_rate=1e-3)


def test_bias_update_is_sign_of_load_deviation_and_stays_float32():
    router = _router(E=4, expert_bias=True, bias_update_rate=0.01).to(torch.bfloat16)
    assert router.expert_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
    router.update_expert_bias(torch.tensor([3.0, 1.0, 0.0, 4.0]))  # mean 2
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    router.expert_load.fill_(5.0)
    router.update_expert_bias()  # balanced load: no change, counts reset
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    assert router.expert_load.sum() == 0


def test_update_expert_biases_sums_loads_over_ranks_and_counts_training_tokens_only():
    moe = MoE(16, 8, 4, top_k=2, capacity_factor=None, score_function="sigmoid", expert_bias=True,
              bias_update_rate=0.1)  # fmt: skip
    x = torch.randn(30, 16)
    moe.eval()
    moe(x)
    assert moe.router.expert_load.sum() == 0  # eval forwards are not counted
    moe.train()
    moe(x)
    local = moe.router.expert_load.clone()
    assert local.sum() == 60
    other_rank = torch.tensor([0.0, 0.0, 60.0, 0.0])
    n = update_expert_biases(moe, all_reduce_sum=lambda t: t + other_rank)
    total = local + other_rank
    assert n == 1
    torch.testing.assert_close(moe.router.expert_bias, 0.1 * torch.sign(total.mean() - total))


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    router = Router(16, 8, 2, capacity_factor=None, score_function="sigmoid", expert_bias=True,
                    bias_update_rate=0.02)  # fmt: skip
    with torch.no_grad():
        router.weight.normal_()
        router.weight[0] += 2.0  # expert 0 is everyone's favourite
    x_fixed = torch.randn(512, 16).abs()

    def imbalance():
        with torch.no_grad():
            load = router(x_fixed).tokens_per_expert
        return float(load.max() / load.mean())

    router.train()
    before = imbalance()
    router.expert_load.zero_()
    for _ in range(150):
        with torch.no_grad():
            router(torch.randn(256, 16).abs())
        router.update_expert_bias()
    after = imbalance()
    assert before > 2.0 and after < 1.3, (before, after)


class _TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        cfg = GPTConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=2, num_experts=4, top_k=2,
                        capacity_factor=None, dropout=0.0, score_function="sigmoid", expert_bias=True,
                        bias_update_rate=0.01)  # fmt: skip
        self.model = GPT(cfg)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_updates_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    module = _TinyLM()
    routers = [m.router for m in module.model.moe_layers()]
    updates = []
    for router in routers:
        original = router.update_expert_bias
        router.update_expert_bias = lambda load=None, original=original: (updates.append(1), original(load))[1]
    data = torch.utils.data.TensorDataset(torch.randint(32, (12, 8)))
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, callbacks=[ExpertBiasUpdate()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert len(updates) == 3 * len(routers)
    assert all(r.expert_bias.abs().sum() > 0 for r in routers)


# --- the Triton path routes unsupported options through the torch router, in one place ----------------


def test_triton_backend_falls_back_to_torch_router_under_interpreter():
    if IN_INTERPRETER:
        pytest.skip("this process already runs the interpreter test")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "interpreter_child"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"1 passed", proc.stdout), proc.stdout[-2000:]


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child pytest")
def test_interpreter_child_fallback_matches_torch_backend():
    from lightning_moe.kernels import triton_route
    from lightning_moe.kernels.router import TritonRoutingResult

    kw = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, capacity_factor=None, aux_loss_weight=0.01)
    for options, fused in [({}, True), (dict(score_function="sigmoid", expert_bias=True, expert_groups=4, top_groups=2,
                                             routed_scaling_factor=2.5), False)]:  # fmt: skip
        torch.manual_seed(0)
        ref = MoE(backend="torch", **kw, **options)
        tri = MoE(backend="triton", **kw, **options)
        tri.load_state_dict(ref.state_dict())
        x = torch.randn(24, 16)
        routing = triton_route(tri.router, x)
        assert isinstance(routing, TritonRoutingResult) == fused
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yt = ref(xr), tri(xt)
        torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-5)
        (yr.square().sum() + ref.aux_loss).backward()
        (yt.square().sum() + tri.aux_loss).backward()
        torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tri.experts.w1.grad, ref.experts.w1.grad, rtol=1e-4, atol=1e-5)
