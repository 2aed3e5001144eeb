"""Compare the m3_tiny MoE run with its dense baseline: a markdown table and a validation-loss plot.

Usage (after `lightning-moe fit -c recipes/m3_tiny.yaml` and `... m3_tiny_dense.yaml`):

    python scripts/compare_main_job.py runs/m3_tiny runs/m3_tiny_dense \
        --png docs/images/m3_tiny_vs_dense_val_loss.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("moe_run", type=Path, help="CSVLogger version folder of the MoE run")
    parser.add_argument("dense_run", type=Path, help="CSVLogger version folder of the dense run")
    parser.add_argument("--png", type=Path, default=None, help="where to write the validation-loss plot")
    args = parser.parse_args()
    runs = {"MoE (m3_tiny)": read_metrics(args.moe_run), "dense (m3_tiny_dense)": read_metrics(args.dense_run)}
    print("| model | steps | val/loss | val/ppl | val/chrf (beam) | val/chrf (greedy) | val/bleu (beam) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in runs.items():
        last = {}
        for key in ("val/loss", "val/ppl", "val/chrf", "val/chrf_greedy", "val/bleu"):
            values = series(rows, key)
            last[key] = values[-1] if values else (0, float("nan"))
        step = last["val/loss"][0]
        print(
            f"| {name} | {step} | {last['val/loss'][1]:.3f} | {last['val/ppl'][1]:.1f} | {last['val/chrf'][1]:.1f} "
            f"| {last['val/chrf_greedy'][1]:.1f} | {last['val/bleu'][1]:.1f} |"
        )
    if args.png is not None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for name, rows in runs.items():
            steps, losses = zip(*series(rows, "val/loss"), strict=True)
            ax.plot(steps, losses, marker="o", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (token NLL)")
        ax.set_title("m3_tiny: MoE vs dense, same per-token compute")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
