"""The memory estimator against measured peaks: the GPT MoE benchmark model trained on one GPU.

Each case trains a few steps of a GPT MoE (bf16-mixed, AdamW, synthetic tokens) with
``ExpertParallelStrategy`` on one GPU (world size 1) in its own process, and records:

- ``torch.cuda.max_memory_allocated`` over the forward + backward, at the end of the backward, over
  the optimizer step (steps 2 onwards, when the AdamW state exists), and its maximum: the peak;
- the activations: the allocated bytes the forward adds (end of forward minus start of step, which
  includes what activation checkpointing keeps) and, without checkpointing, the bytes of the
  tensors autograd saved (``SavedTensorBytes``, an exact count);
- the step time and the process's peak resident host memory (offload: pinned parameters and
  gradients, optimizer state);

next to :func:`lightning_moe.strategy.memory.estimate_memory` for the same model and layout, with
the ratio measured / estimated. Then it searches the largest model (scaling the layers of the
benchmark shape) that trains a step without and with ``cpu_offload``, starting from the
estimator's prediction. Results go to ``OUT/memory_check.json`` and ``OUT/memory_check.csv``.

Usage (one H200; about 6 minutes; ``--budget-s`` stops starting new cases when it runs out)::

    python benchmarks/memory_check.py --out-dir results/memory --budget-s 360
    python benchmarks/memory_check.py --out-dir /tmp/mc --cpu-smoke   # tiny, CPU, gloo: checks the script
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _var, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_var, _value)

GiB = 1024**3

# The GPT MoE benchmark shape of docs/benchmarks.md (every layer MoE, 64 experts, top-2, SwiGLU).
BASE_MODEL: dict[str, Any] = dict(
    vocab_size=32000, d_model=2048, n_heads=16, d_ff=5632, n_layers=8, moe_every=1, num_experts=64, top_k=2,
    expert_ffn_size=1408, activation="swiglu", dropout=0.0, max_positions=2048, positions="learned",
    capacity_factor=None, aux_loss_weight=0.01,
)  # fmt: skip
SMOKE_MODEL: dict[str, Any] = dict(
    vocab_size=128, d_model=64, n_heads=4, d_ff=128, n_layers=2, moe_every=1, num_experts=4, top_k=2,
    expert_ffn_size=64, activation="swiglu", dropout=0.0, max_positions=64, positions="learned",
    capacity_factor=None, aux_loss_weight=0.01, moe_backend="torch",
)  # fmt: skip


def _device_memory() -> int:
    """Bytes of memory of GPU 0 (0 without CUDA), read in this process."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


def _cases(smoke: bool, steps: int = 3, device_memory: int = 0) -> list[dict[str, Any]]:
    """The cases in the order they run (most important first)."""
    model = SMOKE_MODEL if smoke else dict(BASE_MODEL)
    if not smoke and 0 < device_memory < 100 * GiB:  # an 80 GB H100: 5 of the 8 layers (about 60 GiB)
        model["n_layers"] = 5
    batch, seq = (2, 32) if smoke else (8, 2048)
    base = dict(model=model, batch_size=batch, seq_len=seq, data_parallel="fsdp", activation_checkpointing=None,
                cpu_offload=False, moe_backend="torch" if smoke else "triton", steps=3)  # fmt: skip

    def case(name: str, **changes: Any) -> dict[str, Any]:
        return {**base, "name": name, **changes}

    cases = [
        case("fsdp", steps=steps),
        case("ddp", data_parallel="ddp", steps=steps),
        case("fsdp+ac_full", activation_checkpointing="full"),
        case("fsdp+ac_experts", activation_checkpointing="experts"),
        case("fsdp+offload", cpu_offload=True),
        case("fsdp+torch_backend", moe_backend="torch"),
        case("fsdp+ac_full+offload", activation_checkpointing="full", cpu_offload=True),
        case(
            "fsdp_L16_E32", model={**model, "n_layers": 16 if not smoke else 3, "num_experts": 32 if not smoke else 2}
        ),
    ]
    return cases


# ---------------------------------------------------------------------------------------------
# worker: one case in its own process


def _estimate(case: dict[str, Any]):
    from lightning_moe.models import GPTConfig
    from lightning_moe.strategy.memory import estimate_memory

    return estimate_memory(
        GPTConfig(**case["model"]),
        batch_size=case["batch_size"],
        seq_len=case["seq_len"],
        world_size=1,
        data_parallel=case["data_parallel"],
        cpu_offload=case["cpu_offload"],
        activation_checkpointing=case["activation_checkpointing"],
        precision=case["precision"],
        moe_backend=case["moe_backend"],
    )


def run_worker(case: dict[str, Any]) -> dict[str, Any]:
    """Train ``case['steps']`` steps and measure; runs in a fresh process."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_moe import ExpertParallelStrategy
    from lightning_moe.models import GPT, GPTConfig
    from lightning_moe.modules.optim import adamw_with_schedule
    from lightning_moe.strategy.activation_memory import SavedTensorBytes

    cuda = torch.cuda.is_available() and not case.get("cpu", False)
    config = GPTConfig(**{**case["model"], "moe_backend": case["moe_backend"]})

    class GPTModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: GPT | None = None

        def configure_model(self) -> None:
            if self.model is None:  # on the meta device: the strategy materialises this rank's shards
                self.model = GPT(config)

        def training_step(self, batch, batch_idx):
            ids, labels = batch  # LanguageModelModule's loss: token cross-entropy + aux losses
            logits = self.model(ids)
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            return nll / labels.numel() + self.model.moe_aux_loss()

        def configure_optimizers(self):
            return adamw_with_schedule(self.model, 1e-4, 0.1, (0.9, 0.95), 1e-8, "constant", 0, None)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.saved: SavedTensorBytes | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            reset_peak()
            self.steps.append({"start": allocated(), "t0": time.perf_counter()})
            if batch_idx == 1:
                self.saved = SavedTensorBytes([pl_module]).__enter__()

        def on_before_backward(self, trainer, pl_module, loss):
            sync()
            step = self.steps[-1]
            step.update(forward_end=allocated(), forward_peak=peak())
            if self.saved is not None:
                self.saved.__exit__(None, None, None)
                step["saved_tensor_bytes"] = self.saved.nbytes
                largest = sorted(self.saved.storages.values(), key=lambda s: -s[2])[:8]
                step["largest_saved"] = [f"{list(shape)} {dtype} {n / GiB:.3f} GiB" for shape, dtype, n in largest]
                self.saved = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sync()
            self.steps[-1].update(backward_end=allocated(), backward_peak=peak())
            reset_peak()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            step = self.steps[-1]
            step.update(step_peak=peak(), end=allocated(), seconds=time.perf_counter() - step.pop("t0"))

    result: dict[str, Any] = {"name": case["name"], "case": case, "ok": False}
    estimate = _estimate(case)
    result["estimate"] = {k: v for k, v in asdict(estimate).items() if k not in ("activation_parts",)}
    result["estimate_parts"] = dict(estimate.activation_parts)
    if cuda:
        result["device"] = torch.cuda.get_device_name()
        result["device_total"] = torch.cuda.get_device_properties(0).total_memory
    result["torch"] = torch.__version__
    steps, B, S = case["steps"], case["batch_size"], case["seq_len"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, (steps * B, S + 1), generator=generator)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=B)
    probe = Probe()
    strategy = ExpertParallelStrategy(
        expert_parallel_size=1,
        data_parallel=case["data_parallel"],
        cpu_offload=case["cpu_offload"],
        activation_checkpointing=case["activation_checkpointing"],
    )
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=case["precision"],
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        callbacks=[probe],
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        trainer.fit(GPTModule(), train_dataloaders=loader)
        result["ok"] = len(probe.steps) == steps and "step_peak" in probe.steps[-1]
    except Exception as err:  # an OOM is a result, not a crash of the check
        result["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        result["traceback"] = traceback.format_exc()[-2000:]
        result["peak_at_failure"] = peak()
    result["wall_s"] = time.perf_counter() - t0
    result["steps"] = probe.steps
    result["host_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ---------------------------------------------------------------------------------------------
# the parent: run cases within the budget, compare, write


def _summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Flat comparison row: measured over steps 2.. (AdamW state exists), estimate, ratios."""
    est = result.get("estimate", {})
    phases = est.get("phases", {})
    row: dict[str, Any] = {"case": result["name"], "ok": result.get("ok", False), "error": result.get("error", "")}
    steady = [s for s in result.get("steps", [])[1:] if "step_peak" in s] or [
        s for s in result.get("steps", []) if "step_peak" in s
    ]
    measured: dict[str, float | None] = {}
    if steady:
        measured = {
            "peak": max(max(s["forward_peak"], s["backward_peak"], s["step_peak"]) for s in steady),
            "backward": max(max(s["forward_peak"], s["backward_peak"]) for s in steady),
            "end of backward": max(s["backward_end"] for s in steady),
            "optimizer step": max(s["step_peak"] for s in steady),
            "activations (forward adds)": max(s["forward_end"] - s["start"] for s in steady),
            "saved tensors (hook)": next((s["saved_tensor_bytes"] for s in steady if "saved_tensor_bytes" in s), None),
            "step_s": sum(s["seconds"] for s in steady) / len(steady),
        }
    expected = {
        "peak": est.get("total"),
        "backward": phases.get("backward"),
        "end of backward": phases.get("end of backward"),
        "optimizer step": phases.get("optimizer step"),
        # the forward adds its activations, and with "ddp" keeps every unit gathered
        "activations (forward adds)": None
        if not est
        else est.get("activations_saved", 0) + est.get("gathered_after_forward", 0),
        "saved tensors (hook)": est.get("activations_saved"),
    }
    for key, value in expected.items():
        got = measured.get(key)
        row[f"{key} measured GiB"] = None if got is None else round(got / GiB, 3)
        row[f"{key} estimated GiB"] = None if value is None else round(value / GiB, 3)
        row[f"{key} ratio"] = None if not got or not value else round(got / value, 3)
    row["step_s"] = None if "step_s" not in measured else round(measured["step_s"], 3)
    row["host peak RSS GiB"] = round(result.get("host_peak_rss", 0) / GiB, 2)
    row["host estimated GiB"] = round(est.get("host_total", 0) / GiB, 2)
    row["parameters"] = est.get("parameters_count")
    return row


def _run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"name": case["name"], "case": case, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"name": case["name"], "case": case, "ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def _host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _predicted_layers(case: dict[str, Any], gpu_limit: float, host_limit: float) -> int:
    """The most layers of the case's shape whose estimate fits the GPU (and, with offload, the host)."""
    best = 0
    for layers in range(1, 200):
        trial = {**case, "model": {**case["model"], "n_layers": layers}}
        est = _estimate(trial)
        if est.total > gpu_limit or (case["cpu_offload"] and est.host_total > host_limit):
            break
        best = layers
    return best


def _search(
    base: dict[str, Any], offload: bool, gpu_total: float, host_total: float, deadline: float, results: list
) -> dict[str, Any]:
    """Largest layer count that trains two steps, starting from the estimator's prediction."""
    case = {**base, "cpu_offload": offload, "activation_checkpointing": "full" if offload else None, "steps": 2}
    predicted = _predicted_layers(case, 0.97 * gpu_total, 0.92 * host_total)
    tried: dict[int, bool] = {}
    layers = max(predicted, 1)
    while time.time() < deadline - 30 and len(tried) < 4:
        trial = {**case, "name": f"largest{'+offload' if offload else ''}_L{layers}"}
        trial["model"] = {**case["model"], "n_layers": layers}
        result = _run_case(trial, timeout=max(30.0, min(240.0, deadline - time.time())))
        results.append(result)
        tried[layers] = bool(result.get("ok"))
        print(
            f"  search offload={offload}: {layers} layers -> {'ok' if tried[layers] else result.get('error', '')[:120]}"
        )
        if tried[layers] and layers + 1 not in tried:
            layers += 1
        elif not tried[layers] and layers - 1 not in tried and layers > 1:
            layers -= 1
        else:
            break
    largest = max((n for n, ok in tried.items() if ok), default=0)
    params = None
    if largest:
        from lightning_moe.models import GPTConfig

        params = GPTConfig(**{**case["model"], "n_layers": largest}).total_parameters()
    return {"offload": offload, "predicted_layers": predicted, "largest_layers": largest, "tried": tried,
            "largest_parameters": params}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=False, default="results/memory_check")
    parser.add_argument("--budget-s", type=float, default=360.0, help="no new case starts after this many seconds")
    parser.add_argument("--cases", default="all", help="comma-separated case names, or 'all'")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-model search")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (gloo, 32-true): checks the script")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the fsdp and ddp cases (timed from 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        case = json.loads(args.worker)
        result = run_worker(case)
        print(json.dumps(result, default=str))
        return

    start = time.time()
    deadline = start + args.budget_s
    device_memory = 0 if args.cpu_smoke else _device_memory()
    cases = _cases(args.cpu_smoke, args.steps, device_memory)
    for case in cases:
        case["precision"] = "32-true" if args.cpu_smoke else "bf16-mixed"
        case["cpu"] = args.cpu_smoke
    if args.cpu_smoke:  # offload needs CUDA
        cases = [c for c in cases if not c["cpu_offload"]]
    if args.cases != "all":
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    results: list[dict[str, Any]] = []
    for case in cases:
        remaining = deadline - time.time()
        if remaining < 20:
            print(f"budget spent: skipping {case['name']}")
            results.append({"name": case["name"], "case": case, "ok": False, "error": "skipped (budget)"})
            continue
        result = _run_case(case, timeout=min(remaining, 180.0))
        results.append(result)
        row = _summarise(result)
        print(
            f"{row['case']:<24} ok={row['ok']!s:<5} peak {row['peak measured GiB']} / est {row['peak estimated GiB']} "
            f"GiB (ratio {row['peak ratio']})  step {row['step_s']} s  {row['error'][:100]}"
        )
    searches = []
    if not args.no_search and not args.cpu_smoke:
        gpu_total = device_memory or next((r["device_total"] for r in results if "device_total" in r), 139 * GiB)
        base = next(c for c in _cases(False, 2, device_memory) if c["name"] == "fsdp")
        base = {**base, "precision": "bf16-mixed", "cpu": False}
        for offload in (False, True):
            if time.time() > deadline - 45:
                searches.append({"offload": offload, "skipped": "budget"})
                continue
            searches.append(_search(base, offload, gpu_total, _host_memory(), deadline, results))

    rows = [_summarise(r) for r in results]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"host_memory": _host_memory(), "wall_s": time.time() - start, "budget_s": args.budget_s}
    (out / "memory_check.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "searches": searches, "results": results}, indent=1, default=str)
    )
    with open(out / "memory_check.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print()
    keys = [
        "peak",
        "backward",
        "end of backward",
        "optimizer step",
        "activations (forward adds)",
        "saved tensors (hook)",
    ]
    header = f"{'case':<28}" + "".join(f"{k[:22]:>26}" for k in keys) + f"{'step s':>9}{'host RSS/est GiB':>18}"
    print("measured / estimated GiB (ratio)")
    print(header)
    for row in rows:
        cells = []
        for k in keys:
            m, e, r = row[f"{k} measured GiB"], row[f"{k} estimated GiB"], row[f"{k} ratio"]
            cells.append(f"{'-' if m is None else m}/{'-' if e is None else e} ({'-' if r is None else r})")
        host = f"{row['host peak RSS GiB']}/{row['host estimated GiB']}"
        print(f"{row['case']:<28}" + "".join(f"{c:>26}" for c in cells) + f"{row['step_s'] or '-':>9}{host:>18}")
    for s in searches:
        print("search:", json.dumps(s, default=str))
    print(f"\nwrote {out / 'memory_check.json'} and {out / 'memory_check.csv'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
