"""Expert-parallel training throughput: tokens/s per GPU and time in all-to-all.

Trains the GPT MoE language model (``LanguageModelModule``, bf16-mixed, synthetic tokens) through
Lightning in four configurations with the same per-GPU batch:

- ``1gpu``: one GPU, Lightning's single-device strategy (the baseline);
- ``ddp``: 2 GPUs, Lightning's plain ``DDPStrategy`` (every expert replicated, for reference);
- ``ep1``: 2 GPUs, ``ExpertParallelStrategy(expert_parallel_size=1)`` (DDP-equivalent);
- ``ep2``: 2 GPUs, ``ExpertParallelStrategy(expert_parallel_size=2)`` (4 of 8 experts per GPU).

Tokens/s per GPU counts the tokens one GPU trains on per second between two CUDA
synchronisations around the timed steps (after warm-up). All-to-all time is measured with CUDA
events around every ``all_to_all_single`` call (counts and tokens, forward and backward); it
includes waiting for the slower peer. Expert-gradient all-reduce time is measured the same way.

Usage (2 GPUs; NCCL with NVLink multicast off)::

    python benchmarks/ep_throughput.py --all --json results.json
    python benchmarks/ep_throughput.py --config ep2            # one configuration
    python benchmarks/ep_throughput.py --all --cpu-smoke        # tiny model, CPU, gloo: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_var, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

CONFIGS = {
    "1gpu": {"devices": 1, "strategy": "single"},
    "ddp": {"devices": 2, "strategy": "ddp"},
    "ep1": {"devices": 2, "strategy": "ep", "ep": 1},
    "ep2": {"devices": 2, "strategy": "ep", "ep": 2},
}


class CollectiveTimer:
    """Times ``dist.all_to_all_single`` and ``dist.all_reduce`` calls (CUDA events, or host clock on CPU)."""

    def __init__(self) -> None:
        self.enabled = False
        self.records: dict[str, list] = {"all_to_all": [], "all_reduce": []}
        self.calls = {"all_to_all": 0, "all_reduce": 0}
        self._orig = {"all_to_all": dist.all_to_all_single, "all_reduce": dist.all_reduce}
        dist.all_to_all_single = self._wrap("all_to_all")
        dist.all_reduce = self._wrap("all_reduce")

    def _wrap(self, kind: str):
        orig = self._orig[kind]

        def timed(*args, **kwargs):
            if not self.enabled:
                return orig(*args, **kwargs)
            self.calls[kind] += 1
            tensor = args[0] if args else next(iter(kwargs.values()))
            if tensor.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = orig(*args, **kwargs)
                if kwargs.get("async_op"):
                    out.wait()  # async all-reduces are waited for right away by their caller anyway
                end.record()
                self.records[kind].append((start, end))
            else:
                t0 = time.perf_counter()
                out = orig(*args, **kwargs)
                if kwargs.get("async_op"):
                    out.wait()
                self.records[kind].append(time.perf_counter() - t0)
            return out

        return timed

    def reset(self) -> None:
        self.records = {k: [] for k in self.records}
        self.calls = {k: 0 for k in self.calls}

    def total_ms(self, kind: str) -> float:
        total = 0.0
        for rec in self.records[kind]:
            total += rec[0].elapsed_time(rec[1]) if isinstance(rec, tuple) else rec * 1e3
        return total


def build_module(args: argparse.Namespace):
    from lightning_moe.modules import LanguageModelModule

    return LanguageModelModule(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_ff=args.d_ff,
        n_layers=args.n_layers,
        max_positions=args.seq,
        activation="swiglu",
        moe_every=2,
        num_experts=args.experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        moe_backend=args.backend,
        dropout=0.0,
        lr=1e-4,
        warmup_steps=0,
        schedule="constant",
    )


def run_config(name: str, args: argparse.Namespace) -> None:
    """One configuration (re-launched per device by Lightning's launcher); rank 0 writes JSON."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_moe.strategy import ExpertParallelStrategy

    cfg = CONFIGS[name]
    timer = CollectiveTimer()
    cpu = args.cpu_smoke
    L.seed_everything(0, verbose=False)
    torch.backends.cuda.matmul.allow_tf32 = True

    class Tokens(Dataset):
        def __init__(self, n: int, rank: int) -> None:
            self.n, self.rank = n, rank

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(1_000_003 * self.rank + i)
            ids = torch.randint(args.vocab, (args.seq + 1,), generator=g)
            return {"input_ids": ids[:-1], "labels": ids[1:]}

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            n = (args.warmup + args.steps + 2) * args.batch
            return DataLoader(Tokens(n, self.trainer.global_rank), batch_size=args.batch, num_workers=2)

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                if not cpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                timer.reset()
                timer.enabled = True
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx != args.warmup + args.steps - 1:
                return
            if not cpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.t0
            timer.enabled = False
            tokens = args.steps * args.batch * args.seq
            mine = torch.tensor(
                [
                    tokens / seconds,
                    1e3 * seconds / args.steps,
                    timer.total_ms("all_to_all") / args.steps,
                    timer.total_ms("all_reduce") / args.steps,
                    0.0 if cpu else torch.cuda.max_memory_allocated() / 2**30,
                ],
                dtype=torch.float64,
                device=pl_module.device,
            )
            every = trainer.strategy.all_gather(mine).reshape(-1, mine.numel()).cpu()
            if trainer.is_global_zero:
                result = {
                    "config": name,
                    "devices": cfg["devices"],
                    "expert_parallel_size": cfg.get("ep"),
                    "tokens_per_s_per_gpu": float(every[:, 0].mean()),
                    "step_ms": float(every[:, 1].max()),
                    "all_to_all_ms_per_step": float(every[:, 2].mean()),
                    "all_to_all_calls_per_step": timer.calls["all_to_all"] / args.steps,
                    "expert_allreduce_ms_per_step": float(every[:, 3].mean()),
                    "peak_mem_gib": float(every[:, 4].max()),
                    "per_gpu_batch_tokens": args.batch * args.seq,
                }
                Path(args.json).write_text(json.dumps(result))
            trainer.should_stop = True

    if cfg["strategy"] == "single":
        strategy = "auto"
    elif cfg["strategy"] == "ddp":
        strategy = L.pytorch.strategies.DDPStrategy()
    else:
        strategy = ExpertParallelStrategy(expert_parallel_size=cfg["ep"])
    trainer = L.Trainer(
        accelerator="cpu" if cpu else "gpu",
        devices=cfg["devices"],
        strategy=strategy,
        precision="32-true" if cpu else "bf16-mixed",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Meter()],
    )
    trainer.fit(build_module(args), datamodule=Data())


def markdown_table(results: list[dict]) -> str:
    base = next((r for r in results if r["config"] == "1gpu"), None)
    lines = [
        "| configuration | GPUs | EP | tokens/s per GPU | vs 1 GPU | step (ms) | all-to-all (ms/step) "
        "| expert grad all-reduce (ms/step) | peak memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "1gpu": "1 GPU (single device)",
        "ddp": "2 GPUs, DDPStrategy",
        "ep1": "2 GPUs, EP=1",
        "ep2": "2 GPUs, EP=2",
    }
    for r in results:
        ratio = f"{100 * r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.1f}%" if base else "-"
        lines.append(
            f"| {names[r['config']]} | {r['devices']} | {r['expert_parallel_size'] or '-'} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {r['step_ms']:.1f} | {r['all_to_all_ms_per_step']:.2f} "
            f"| {r['expert_allreduce_ms_per_step']:.2f} | {r['peak_mem_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), help="run one configuration")
    parser.add_argument("--all", action="store_true", help="run every configuration in turn")
    parser.add_argument("--configs", default="1gpu,ddp,ep1,ep2", help="with --all: which, comma-separated")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU with gloo")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "triton"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.cpu_smoke:
        args.d_model, args.n_heads, args.d_ff, args.n_layers, args.experts = 32, 4, 64, 2, 4
        args.vocab, args.seq, args.batch, args.warmup, args.steps = 64, 16, 4, 1, 2
    if args.config:
        if args.json is None:
            args.json = os.path.join(tempfile.gettempdir(), f"ep_throughput_{args.config}.json")
        run_config(args.config, args)
        return
    if not args.all:
        parser.error("pass --config NAME or --all")
    results = []
    passthrough = [a for a in sys.argv[1:] if a != "--all"]
    for i, name in enumerate(args.configs.split(",")):
        out = os.path.join(tempfile.gettempdir(), f"ep_throughput_{name}.json")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, os.path.abspath(__file__), *_drop_json(passthrough), "--config", name, "--json", out]
        print(f"[{i + 1}] {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"configuration {name} failed (exit {proc.returncode})", flush=True)
            continue
        results.append(json.loads(Path(out).read_text()))
        print(json.dumps(results[-1]), flush=True)
    table = markdown_table(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "table": table, "args": vars(args)}, indent=1))


def _drop_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--json":
            skip = True
            continue
        if not a.startswith("--json="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
