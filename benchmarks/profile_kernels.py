"""Where the time goes: torch.profiler tables of the router and of one MoE layer (GPU).

Profiles, after warm-up, a few forward+backward calls of

- the fused router (``triton_route``) and the eager ``Router`` at T=16384, H=4096, E=64, k=6
  (capacity factor 1.25, Random Token Selection);
- ``MoE(backend="triton")`` at one benchmark shape (``--shape``, an index into
  ``moe_layer_benchmark.SHAPES``),

and prints each one's top operations by device time and by host time (tables also written to
``--out``/profile_kernels.txt).

    CUDA_VISIBLE_DEVICES=0 python benchmarks/profile_kernels.py --shape 2 --out results/
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moe_layer_benchmark import SHAPES

from lightning_moe import MoE
from lightning_moe.kernels import triton_route


def _profile(name: str, step, iters: int = 5) -> str:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    text = f"== {name}: {iters} calls ==\n"
    text += table.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60) + "\n"
    text += table.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60) + "\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shape", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    T, H, E, k = 16384, 4096, 64, 6
    moe = MoE(H, 64, E, k, capacity_factor=1.25, random_token_selection=True).cuda()
    router = moe.router.train()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def router_step(route):
        def step():
            x.grad = None
            router.weight.grad = None
            r = route()
            (r.weights.sum() + r.aux_loss + r.z_loss).backward()

        return step

    out = _profile("fused router fwd+bwd", router_step(lambda: triton_route(router, x)))
    out += _profile("eager router fwd+bwd", router_step(lambda: router(x)))
    Ts, Hs, Fs, Es, ks = SHAPES[args.shape]
    layer = MoE(Hs, Fs, Es, ks, capacity_factor=None, backend="triton").cuda().to(torch.bfloat16)
    xs = torch.randn(Ts, Hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(xs)

    def layer_step():
        xs.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(xs)
        (y * dy).sum().add(layer.aux_loss).backward()

    out += _profile(f"MoE(backend='triton') fwd+bwd {SHAPES[args.shape]}", layer_step)
    with open(os.path.join(args.out, "profile_kernels.txt"), "w") as f:
        f.write(out)
    print(out)


if __name__ == "__main__":
    main()
