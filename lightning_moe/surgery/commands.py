"""``lightning-moe prune`` and ``lightning-moe aggregate``: model surgery from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lightning_moe.surgery.checkpoints import SurgeryError


def _prune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe prune",
        description="Keep the N most-used experts of every MoE layer (usage counted on a dataset) and save the "
        "smaller model.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of a translation model (.ckpt or sharded directory)")
    parser.add_argument("--keep", required=True, type=int, help="experts kept per MoE layer (N)")
    parser.add_argument("--out", required=True, help="output checkpoint file")
    parser.add_argument(
        "--data", default=None,
        help="corpus directory or .jsonl[.gz] file to count usage on (default: the bundled corpus)",
    )  # fmt: skip
    parser.add_argument("--split", default="validation", help="split of a corpus directory (default: validation)")
    parser.add_argument(
        "--per-direction", default=None, metavar="SRC-TGT",
        help="count usage on this translation direction only (e.g. de-en): the experts one language pair uses",
    )  # fmt: skip
    parser.add_argument(
        "--selection", default="most-used", choices=("most-used", "random"),
        help="most-used (default) or random experts (the paper's comparison)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of --selection random")
    parser.add_argument("--usage-json", default=None, help="also write the usage counts per layer to this JSON file")
    return parser


def prune_main(argv: Sequence[str]) -> int:
    """``lightning-moe prune --ckpt CKPT --keep N --out OUT [--per-direction SRC-TGT]``.

    Returns:
        The exit code: 0, or 2 with a one-line error on bad input.
    """
    from lightning_moe.surgery.prune import prune_experts

    args = _prune_parser().parse_args(list(argv))
    try:
        pruned, usage = prune_experts(
            args.ckpt, args.keep, args.out, data=args.data, split=args.split, direction=args.per_direction,
            selection=args.selection, seed=args.seed,
        )  # fmt: skip
    except (SurgeryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = pruned["lightning_moe_surgery"][-1]
    if args.usage_json:
        with open(args.usage_json, "w", encoding="utf-8") as f:
            json.dump({name: counts.tolist() for name, counts in usage.items()}, f, indent=1)
    print(f"wrote {args.out}: {record['num_experts_before']} -> {record['num_experts_after']} experts per MoE layer")
    for name, kept in record["kept"].items():
        counts = usage[name]
        total = float(counts.sum())
        share = float(counts[kept].sum()) / total if total > 0 else float("nan")
        print(f"  {name}: kept {kept} ({100 * share:.1f}% of the routed assignments)")
    return 0


def _aggregate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe aggregate",
        description="Unite the experts of MoE checkpoints of one architecture: shared weights averaged, gate rows "
        "concatenated, E_A + E_B experts per layer, no optimizer state.",
    )
    parser.add_argument(
        "--ckpt", action="append", required=True, help="a checkpoint; give --ckpt two or more times (A first)"
    )
    parser.add_argument("--out", required=True, help="output checkpoint file")
    return parser


def aggregate_main(argv: Sequence[str]) -> int:
    """``lightning-moe aggregate --ckpt A --ckpt B [...] --out OUT``.

    Returns:
        The exit code: 0, or 2 with a one-line error on bad input.
    """
    from lightning_moe.surgery.aggregate import aggregate_experts

    args = _aggregate_parser().parse_args(list(argv))
    try:
        checkpoint = aggregate_experts(args.ckpt, args.out)
    except (SurgeryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = checkpoint["lightning_moe_surgery"][-1]
    print(
        f"wrote {args.out}: {' + '.join(map(str, record['num_experts_before']))} = {record['num_experts_after']} "
        "experts per MoE layer; continue training with `lightning-moe fit -c RECIPE --ckpt_path "
        f"{args.out}` and num_experts={record['num_experts_after']}"
    )
    return 0


__all__ = ["aggregate_main", "prune_main"]
