"""``python -m lightning_moe.strategy.consolidate SRC DST``: one inference file from a sharded checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_moe.strategy.checkpoint import METADATA_KEY, consolidate_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_moe.strategy.consolidate SRC DST``: consolidate a sharded checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_moe.strategy.consolidate",
        description="Consolidate an expert-sharded checkpoint directory into one file for inference.",
    )
    parser.add_argument("src", help="checkpoint directory written by ExpertParallelStrategy")
    parser.add_argument("dst", help="output file")
    parser.add_argument(
        "--weights-only", action="store_true", help="drop optimizer, scheduler, loop and callback state"
    )
    args = parser.parse_args(argv)
    checkpoint = consolidate_checkpoint(args.src, args.dst, weights_only_model=args.weights_only)
    layers = checkpoint.get(METADATA_KEY, {}).get("layers", {})
    print(f"wrote {args.dst}: {len(layers)} MoE layers, experts {[v['num_experts'] for v in layers.values()]}")


if __name__ == "__main__":
    main()
