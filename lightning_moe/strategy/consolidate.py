"""``python -m lightning_moe.strategy.consolidate SRC DST``: one inference file from a sharded checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_moe.strategy.checkpoint import consolidate_checkpoint, tensor_count


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_moe.strategy.consolidate SRC DST``: consolidate a sharded checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_moe.strategy.consolidate",
        description="Consolidate an expert-sharded checkpoint directory into one file for inference.",
    )
    parser.add_argument(
        "src", help="checkpoint directory written by ExpertParallelStrategy (distributed or legacy format)"
    )
    parser.add_argument("dst", help="output file")
    parser.add_argument(
        "--weights-only", action="store_true", help="drop optimizer, scheduler, loop and callback state"
    )
    args = parser.parse_args(argv)
    checkpoint = consolidate_checkpoint(args.src, args.dst, weights_only_model=args.weights_only)
    print(f"wrote {args.dst}: {tensor_count(checkpoint)} tensors, every expert once")


if __name__ == "__main__":
    main()
