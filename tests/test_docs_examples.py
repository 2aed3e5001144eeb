"""Every code example in docs/ and README.md runs (Python) or names real commands and files (shell).

Python blocks are read by Sybil's Markdown parser and run top to bottom, one namespace per page, in
a temporary working directory. A block a page marks with ``<!-- skip: next "reason" -->`` is
skipped, and reported as such. Pages whose examples assume a trained checkpoint get tiny ones at
the paths they name (``_SETUP``). Shell blocks are not run (they train for minutes or need GPUs);
each ``lightning-moe`` command must exist and each recipe, script and file it names must be there.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from pathlib import Path
from unittest import SkipTest

import lightning as L
import pytest
import torch
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

from lightning_moe.cli import COMMANDS
from lightning_moe.data import MultilingualDataModule
from lightning_moe.modules import MultitaskTranslationModule

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


@pytest.fixture(scope="module")
def bundled_data() -> MultilingualDataModule:
    data = MultilingualDataModule(vocab_size=4000)
    data.setup()
    return data


def _translation_checkpoint(data: MultilingualDataModule, path: Path, seed: int = 0) -> None:
    """A tiny untrained MultitaskTranslationModule of the bundled corpus's tokenizer, saved by a Trainer."""
    torch.manual_seed(seed)
    module = MultitaskTranslationModule(
        d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, num_experts=8, top_k=2,
        expert_ffn_size=32, moe_backend="torch", eval_max_length=6, num_eval_examples=0,
    )  # fmt: skip
    module.attach_tokenizer(data.tokenizer, data.directions)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)


# page -> checkpoints its examples read (paths relative to the working directory)
_SETUP: dict[str, tuple[str, ...]] = {
    "models.md": ("runs/m3_tiny/checkpoints/last.ckpt",),
    "surgery.md": ("last.ckpt", "seed1.ckpt", "seed2.ckpt"),
    "expert_parallel.md": ("runs/last.ckpt",),
}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page: Path, tmp_path, monkeypatch, request) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for seed, name in enumerate(_SETUP.get(page.name, ())):
        _translation_checkpoint(request.getfixturevalue("bundled_data"), tmp_path / name, seed)
    document = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(page)
    ran, skipped = 0, []
    for example in document:
        try:
            example.evaluate()
        except SkipTest as reason:  # the page says why
            skipped.append(f"line {example.line}: {reason}")
        else:
            ran += isinstance(example.parsed, str)
    python_blocks = len(re.findall(r"^```python\n", page.read_text(encoding="utf-8"), flags=re.M))
    assert ran + len(skipped) == python_blocks, f"{page.name}: {ran} ran, {skipped} skipped, of {python_blocks}"
    if skipped:
        print(f"{page.name}: skipped {skipped}")


def test_moe_layer_example_counts_real_tokens_only(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    document = Sybil(parsers=[PythonCodeBlockParser()]).parse(ROOT / "docs" / "moe_layer.md")
    next(iter(document)).evaluate()
    assert document.namespace["moe"].last_stats.tokens_per_expert.sum().item() == 4 * 12 * 2  # 12 real, top-2


def _shell_commands(page: Path) -> list[list[str]]:
    """The commands of a page's bash blocks, split into words (``&&`` chains and ``\\`` lines joined)."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                for command in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                    commands.append(shlex.split(command, comments=True))
    return commands


def _placeholder(word: str) -> bool:
    """``RECIPE.yaml``, ``CKPT``, ``OUT.ckpt``: a name the reader fills in."""
    stem = Path(word).stem
    return stem.isupper() or "<" in word


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shell_examples_name_real_commands_and_files(page: Path) -> None:
    for words in _shell_commands(page):
        shown = f"{page.name}: `{' '.join(words)}`"
        if words[:1] == ["lightning-moe"] or words[:3] == ["python", "-m", "lightning_moe"]:
            command = words[1] if words[0] == "lightning-moe" else words[3]
            assert command in (*COMMANDS, "--help", "-h", "help"), f"{shown}: no command {command!r}"
            for flag, value in itertools.pairwise(words):
                if flag in ("-c", "--config") and not _placeholder(value):
                    assert (ROOT / value).is_file(), f"{shown}: {value} does not exist"
        elif words[:1] in (["python"], ["python3"]) and len(words) > 1:
            if words[1].endswith(".py"):
                assert (ROOT / words[1]).is_file(), f"{shown}: {words[1]} does not exist"
            elif words[1] == "-m" and words[2].startswith("lightning_moe"):
                assert importlib.util.find_spec(words[2]) is not None, f"{shown}: no module {words[2]}"
