"""The ``lightning-moe`` command line (LightningCLI ``fit``/``validate``/``test``/``predict`` and ``translate``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-moe`` console script."""
    args = sys.argv[1:] if argv is None else argv
    print("usage: lightning-moe {fit,validate,test,predict,translate} ...", file=sys.stderr)
    raise SystemExit(0 if args in ([], ["-h"], ["--help"]) else 2)
