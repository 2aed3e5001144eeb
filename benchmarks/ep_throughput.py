"""Expert-parallel training throughput and weak scaling: tokens/s per GPU, collective time, memory.

Trains the GPT MoE language model (``LanguageModelModule``, bf16-mixed, synthetic tokens) through
Lightning at the same per-GPU batch in each configuration:

- ``1gpu``: one GPU, Lightning's single-device strategy (the baseline);
- ``ddp``: all GPUs, Lightning's plain ``DDPStrategy`` (every expert replicated, for reference);
- ``<fsdp|ddp>_ep<P>[_tp<T>]_n<N>``: ``ExpertParallelStrategy(data_parallel=..., expert_parallel_size=P,
  tensor_parallel_size=T)`` on N GPUs, e.g. ``fsdp_ep4_n4``, ``ddp_ep2_n2``, ``fsdp_ep2_tp2_n4``
  (``ep1`` and ``ep2`` are the 2-GPU ``fsdp_ep1_n2`` and ``fsdp_ep2_n2``).

Tokens/s per GPU counts the tokens one GPU trains on per second between two CUDA
synchronisations around the timed steps (after warm-up); with T > 1 the T ranks of a data-parallel
rank share one batch. Collective time is measured with CUDA events around every call (it includes
waiting for the slower peer): ``all_to_all_single`` (the MoE dispatch, counts and tokens, forward
and backward), ``all_reduce``, and FSDP2's ``all_gather_into_tensor`` / ``reduce_scatter_tensor``.
Each configuration's peak memory is printed next to ``estimate_memory``'s.

Usage (N GPUs; NCCL with NVLink multicast off)::

    python benchmarks/ep_throughput.py --all --gpus 8 --json results.json   # 1gpu, fsdp EP=1..8, ddp, TP=2
    python benchmarks/ep_throughput.py --config fsdp_ep2_n2                   # one configuration
    python benchmarks/ep_throughput.py --all --gpus 2 --cpu-smoke             # tiny model, CPU, gloo
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

ALIASES = {"ep1": "fsdp_ep1_n2", "ep2": "fsdp_ep2_n2"}


def parse_config(name: str, gpus: int = 2) -> dict:
    """``1gpu``, ``ddp`` (plain DDPStrategy on ``gpus``) or ``<fsdp|ddp>_ep<P>[_tp<T>]_n<N>``."""
    name = ALIASES.get(name, name)
    if name == "1gpu":
        return {"devices": 1, "strategy": "single"}
    if name == "ddp":
        return {"devices": gpus, "strategy": "ddp"}
    parts = name.split("_")
    mode = parts[0]
    fields = {p[:2]: int(p[2:]) for p in parts[1:] if p[:2] in ("ep", "tp")}
    for p in parts[1:]:
        if p.startswith("n"):
            fields["n"] = int(p[1:])
    if mode not in ("fsdp", "ddp") or "ep" not in fields or "n" not in fields:
        raise ValueError(f"configuration {name!r} is not 1gpu, ddp or <fsdp|ddp>_ep<P>[_tp<T>]_n<N>")
    return {"devices": fields["n"], "strategy": "ep", "mode": mode, "ep": fields["ep"], "tp": fields.get("tp", 1)}


def default_configs(gpus: int, experts: int) -> list[str]:
    """The weak-scaling sweep on ``gpus`` GPUs: 1 GPU, FSDP at every EP size, DDP at the largest, TP=2."""
    sizes = [p for p in range(1, gpus + 1) if gpus % p == 0 and experts % p == 0 and p & (p - 1) == 0]
    configs = ["1gpu", *(f"fsdp_ep{p}_n{gpus}" for p in sizes), f"ddp_ep{sizes[-1]}_n{gpus}"]
    if gpus >= 2 and gpus % 2 == 0:
        tp_ep = max(p for p in sizes if p <= gpus // 2)
        configs.append(f"fsdp_ep{tp_ep}_tp2_n{gpus}")
    return configs


class CollectiveTimer:
    """Times ``dist.all_to_all_single`` and ``dist.all_reduce`` calls (CUDA events, or host clock on CPU)."""

    def __init__(self) -> None:
        self.enabled = False
        # FSDP2 calls all_gather_single / reduce_scatter_single (torch >= 2.13) or the *_tensor forms.
        names = [
            ("all_to_all", "all_to_all_single"),
            ("all_reduce", "all_reduce"),
            ("all_gather", "all_gather_into_tensor"),
            ("all_gather", "all_gather_single"),
            ("reduce_scatter", "reduce_scatter_tensor"),
            ("reduce_scatter", "reduce_scatter_single"),
        ]
        self.records: dict[str, list] = {kind: [] for kind, _ in names}
        self.calls = {kind: 0 for kind, _ in names}
        self._orig = {fn: getattr(dist, fn) for _, fn in names if hasattr(dist, fn)}
        for kind, fn in names:
            if fn in self._orig:
                setattr(dist, fn, self._wrap(kind, fn))

    def _wrap(self, kind: str, fn: str):
        orig = self._orig[fn]

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

    cfg = parse_config(name, args.gpus)
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
            # the T ranks of a data-parallel rank read one batch (their replicated activations)
            rank = self.trainer.global_rank // cfg.get("tp", 1)
            return DataLoader(Tokens(n, rank), batch_size=args.batch, num_workers=2)

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
                    timer.total_ms("all_gather") / args.steps,
                    timer.total_ms("reduce_scatter") / args.steps,
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
                    "fsdp_all_gather_ms_per_step": float(every[:, 5].mean()),
                    "fsdp_reduce_scatter_ms_per_step": float(every[:, 6].mean()),
                    "estimated_peak_gib": _estimate_gib(args, cfg),
                    "per_gpu_batch_tokens": args.batch * args.seq,
                    "data_parallel": cfg.get("mode"),
                    "tensor_parallel_size": cfg.get("tp", 1),
                }
                Path(args.json).write_text(json.dumps(result))
            trainer.should_stop = True

    if cfg["strategy"] == "single":
        strategy = "auto"
    elif cfg["strategy"] == "ddp":
        strategy = L.pytorch.strategies.DDPStrategy()
    else:
        strategy = ExpertParallelStrategy(
            expert_parallel_size=cfg["ep"], data_parallel=cfg["mode"], tensor_parallel_size=cfg["tp"]
        )
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


def _estimate_gib(args: argparse.Namespace, cfg: dict) -> float | None:
    """``estimate_memory``'s peak for this configuration (None where it does not model it)."""
    if cfg["strategy"] != "ep" or cfg.get("tp", 1) != 1:
        return None
    from lightning_moe.strategy.memory import estimate_memory

    config = build_module(args).config(args.vocab)
    est = estimate_memory(
        config, batch_size=args.batch, seq_len=args.seq, world_size=cfg["devices"], expert_parallel_size=cfg["ep"],
        data_parallel=cfg["mode"], precision="32-true" if args.cpu_smoke else "bf16-mixed",
        moe_backend=args.backend if args.backend != "auto" else "triton",
    )  # fmt: skip
    return est.total / 2**30


def markdown_table(results: list[dict]) -> str:
    base = next((r for r in results if r["config"] == "1gpu"), None)
    lines = [
        "| configuration | GPUs | EP | TP | tokens/s per GPU | vs 1 GPU | step (ms) | all-to-all (ms/step) "
        "| FSDP all-gather + reduce-scatter (ms/step) | all-reduce (ms/step) | peak memory (GiB) | estimated (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{100 * r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.1f}%" if base else "-"
        fsdp = r.get("fsdp_all_gather_ms_per_step", 0.0) + r.get("fsdp_reduce_scatter_ms_per_step", 0.0)
        est = r.get("estimated_peak_gib")
        lines.append(
            f"| {r['config']} | {r['devices']} | {r['expert_parallel_size'] or '-'} | {r.get('tensor_parallel_size', 1)} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {r['step_ms']:.1f} | {r['all_to_all_ms_per_step']:.2f} "
            f"| {fsdp:.2f} | {r['expert_allreduce_ms_per_step']:.2f} | {r['peak_mem_gib']:.1f} "
            f"| {'-' if est is None else f'{est:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run one configuration (see the module docstring)")
    parser.add_argument("--all", action="store_true", help="run every configuration in turn")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the sweep (and of the plain ddp configuration)")
    parser.add_argument("--configs", default=None, help="with --all: which, comma-separated (default: the sweep)")
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
    names = args.configs.split(",") if args.configs else default_configs(args.gpus, args.experts)
    for i, name in enumerate(names):
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
