"""ExpertParallelStrategy on one GPU against plain Lightning: same losses, and the step time of each layout.

Trains a GPT MoE (Triton kernels, dropless) for a few steps with plain Lightning (the reference:
one device, no strategy) and with ``ExpertParallelStrategy`` in each layout (``fsdp``, ``ddp``,
activation checkpointing ``full`` and ``experts``, ``cpu_offload``), each in its own process, and
prints the loss curves' largest difference from the reference, the steady step time, tokens/s and
peak memory. In ``32-true`` the layouts must match the reference to float32 noise; in
``bf16-mixed`` FSDP2 gathers bfloat16 weights where the reference autocasts float32 ones (the same
rounding), so the curves agree to bfloat16 noise.

Usage (one GPU; about 2 minutes)::

    python benchmarks/strategy_check.py --out results/strategy_check.json
    python benchmarks/strategy_check.py --cpu-smoke          # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

MODEL: dict[str, Any] = dict(
    vocab_size=32000, d_model=1024, n_heads=16, d_ff=4096, n_layers=4, moe_every=1, num_experts=32, top_k=2,
    expert_ffn_size=1408, activation="swiglu", dropout=0.0, max_positions=2048, positions="learned",
    capacity_factor=None, aux_loss_weight=0.0,
)  # fmt: skip
SMOKE: dict[str, Any] = dict(
    vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, moe_every=1, num_experts=4, top_k=2,
    expert_ffn_size=48, activation="swiglu", dropout=0.0, max_positions=32, positions="learned",
    capacity_factor=None, aux_loss_weight=0.0,
)  # fmt: skip
LAYOUTS: dict[str, dict[str, Any] | None] = {
    "reference": None,
    "fsdp": dict(data_parallel="fsdp"),
    "ddp": dict(data_parallel="ddp"),
    "fsdp+ac_full": dict(data_parallel="fsdp", activation_checkpointing="full"),
    "fsdp+ac_experts": dict(data_parallel="fsdp", activation_checkpointing="experts"),
    "fsdp+offload": dict(data_parallel="fsdp", cpu_offload=True),
}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_moe import ExpertParallelStrategy
    from lightning_moe.models import GPT, GPTConfig

    cuda = torch.cuda.is_available() and not cfg["cpu"]
    config = GPTConfig(**cfg["model"], moe_backend="triton" if cuda else "torch")
    steps, B, S = cfg["steps"], cfg["batch"], cfg["seq"]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT(config)
            self.losses: list[float] = []
            self.times: list[float] = []

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            loss = F.cross_entropy(self.model(ids).float().flatten(0, 1), labels.flatten())
            self.losses.append(loss.detach())
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)

    torch.manual_seed(0)
    module = Module()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(config.vocab_size, (steps * B, S + 1), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=B)
    layout = cfg["layout"]
    strategy = "auto" if layout is None else ExpertParallelStrategy(expert_parallel_size=1, **layout)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=cfg["precision"],
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
        use_distributed_sampler=False,  # Lightning would shuffle the strategy's training data, not the reference's
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    times = [*module.times, end]
    steady = [b - a for a, b in zip(times[2:-1], times[3:], strict=True)]  # noqa: RUF007 (from step 3: compiled, AdamW state)
    step_s = sum(steady) / max(len(steady), 1)
    return {
        "losses": [float(x) for x in module.losses],
        "step_s": step_s,
        "tokens_per_s": B * S / step_s if step_s else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/strategy_check.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    smoke = args.cpu_smoke
    report: dict[str, Any] = {"model": SMOKE if smoke else MODEL, "rows": []}
    for precision in args.precisions.split(","):
        if smoke and precision != "32-true":
            continue
        reference = None
        for name, layout in LAYOUTS.items():
            if precision == "32-true" and name not in ("reference", "fsdp", "ddp"):
                continue  # float32: the exactness check; the timings are bf16-mixed's
            if smoke and layout is not None and layout.get("cpu_offload"):
                continue
            cfg = {"model": SMOKE if smoke else MODEL, "layout": layout, "precision": precision, "cpu": smoke,
                   "steps": 5 if smoke else args.steps, "batch": 2 if smoke else 8, "seq": 16 if smoke else 2048}  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT,
                timeout=600,
            )  # fmt: skip
            line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
            if line is None:
                row = {"precision": precision, "layout": name, "error": proc.stderr[-1500:]}
            else:
                row = {"precision": precision, "layout": name, **json.loads(line)}
                if reference is None:
                    reference = row
                diff = max(abs(a - b) for a, b in zip(row["losses"], reference["losses"], strict=True))
                row["max_loss_diff_vs_reference"] = diff
                row["step_time_vs_reference"] = row["step_s"] / reference["step_s"] if reference["step_s"] else None
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
