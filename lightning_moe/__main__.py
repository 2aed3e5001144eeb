"""``python -m lightning_moe`` is the ``lightning-moe`` command."""

from lightning_moe.cli import main

if __name__ == "__main__":
    main()
