"""Expert-parallel dispatch (all-to-all over gloo, 2 processes) against one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe import MoE
from lightning_moe.moe import ExpertParallelGroup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(top_k, capacity_factor):
    torch.manual_seed(0)
    moe = MoE(
        hidden_size=8,
        ffn_hidden_size=6,
        num_experts=4,
        top_k=top_k,
        capacity_factor=capacity_factor,
        min_capacity=1,
        random_token_selection=False,
        aux_loss_weight=0.0,
    )
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    xs = [torch.randn(13, 8), torch.randn(9, 8)]  # uneven token counts per rank
    return moe, xs


def _worker(rank, world, port, top_k, capacity_factor, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    moe, xs = _build(top_k, capacity_factor)
    moe.shard_experts(ExpertParallelGroup(group=dist.group.WORLD, size=world, rank=rank))
    x = xs[rank].clone().requires_grad_(True)
    y = moe(x)
    (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "gx": x.grad,
            "w1": moe.experts.w1.grad,
            "w2": moe.experts.w2.grad,
            "gate": moe.router.weight.grad,
            "kept": moe.last_stats.kept_per_expert,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize(("top_k", "capacity_factor"), [(2, None), (1, 1.0), (3, 0.75)])
def test_expert_parallel_matches_single_process(tmp_path, top_k, capacity_factor):
    mp.spawn(_worker, args=(2, _free_port(), top_k, capacity_factor, str(tmp_path)), nprocs=2)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    moe, xs = _build(top_k, capacity_factor)
    grads_w1 = torch.zeros_like(moe.experts.w1)
    grads_w2 = torch.zeros_like(moe.experts.w2)
    for r, x in enumerate(xs):
        moe.zero_grad()
        x = x.clone().requires_grad_(True)
        y = moe(x)  # capacity is per rank: run each rank's tokens separately
        (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        torch.testing.assert_close(res[r]["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["gx"], x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["gate"], moe.router.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["kept"], moe.last_stats.kept_per_expert)
        grads_w1 += moe.experts.w1.grad
        grads_w2 += moe.experts.w2.grad
    # Each rank's local experts collect the gradient from both ranks' tokens.
    torch.testing.assert_close(torch.cat([res[0]["w1"], res[1]["w1"]]), grads_w1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([res[0]["w2"], res[1]["w2"]]), grads_w2, rtol=1e-5, atol=1e-6)


def test_shard_experts_errors():
    moe = MoE(hidden_size=8, ffn_hidden_size=8, num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by expert_parallel_size=4"):
        moe.shard_experts(ExpertParallelGroup(group=None, size=4, rank=0))
