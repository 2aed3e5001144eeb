"""One checkpoint loader for every command: bad checkpoints are one line with exit code 2, foreign pickles never run."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_moe.cli import main
from lightning_moe.io import AtomicCheckpointIO, CheckpointLoadError, load_checkpoint
from lightning_moe.io.checkpoint_loader import scan_checkpoint_directory
from lightning_moe.modules import LanguageModelModule, MultitaskTranslationModule

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _lm_checkpoint(path: Path) -> Path:
    module = LanguageModelModule(d_model=16, n_heads=2, d_ff=32, n_layers=1, num_experts=2, top_k=1, vocab_size=40)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = _lm_checkpoint(tmp_path / "lm.ckpt")
    data = good.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "notes.txt").write_text("hello")
    torch.save({"state_dict": {}, "x": _Payload(tmp_path / "pwned")}, tmp_path / "evil.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "no_state_dict.ckpt")
    return {
        "missing": tmp_path / "missing.ckpt",
        "empty": tmp_path / "empty.ckpt",
        "truncated": tmp_path / "truncated.ckpt",
        "random": tmp_path / "random.ckpt",
        "directory": tmp_path / "not_a_checkpoint",
        "evil": tmp_path / "evil.ckpt",
        "no_state_dict": tmp_path / "no_state_dict.ckpt",
        "wrong_kind": good,
    }


EXPECTED = {
    "missing": "does not exist",
    "empty": "is empty (0 bytes)",
    "truncated": "is truncated or corrupt",
    "random": "is not a PyTorch checkpoint",
    "directory": "is a directory but not a checkpoint",
    "evil": "loading it could run code",
    "no_state_dict": "holds no model weights",
    "wrong_kind": "is a checkpoint of LanguageModelModule, not of MultitaskTranslationModule",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_translate_reports_each_bad_checkpoint_in_one_line(kind, bad_checkpoints, capsys):
    path = bad_checkpoints[kind]
    with pytest.raises(SystemExit) as exc:
        main(["translate", "--ckpt", str(path), "--tgt-lang", "de", "hello"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and str(path.name) in err[0] and EXPECTED[kind] in err[0], err[0]
    assert not (path.parent / "pwned").exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "evil", "wrong_kind"])
def test_lightning_cli_commands_check_ckpt_path(kind, bad_checkpoints, capsys):
    path = bad_checkpoints[kind]
    for command in ("validate", "fit"):
        with pytest.raises(SystemExit) as exc:
            main([command, "-c", str(ROOT / "recipes" / "m3_tiny.yaml"), "--ckpt_path", str(path)])
        assert exc.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and EXPECTED[kind] in err[0], err
    assert not (path.parent / "pwned").exists()


def test_surgery_and_consolidate_use_the_loader(bad_checkpoints, tmp_path, capsys):
    evil = bad_checkpoints["evil"]
    for argv in (
        ["prune", "--ckpt", str(evil), "--keep", "1", "--out", str(tmp_path / "o.ckpt")],
        ["aggregate", "--ckpt", str(evil), "--ckpt", str(evil), "--out", str(tmp_path / "o.ckpt")],
        ["consolidate", str(evil), str(tmp_path / "o.ckpt")],
        ["convert", "--ckpt", str(evil), "--to-hf", str(tmp_path / "hf")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert "loading it could run code" in capsys.readouterr().err, argv
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.ckpt").exists()


def test_exit_code_and_no_traceback_from_the_console(bad_checkpoints):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lightning_moe", "translate", "--ckpt", str(bad_checkpoints["truncated"]), "--tgt-lang",
           "de", "x"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, check=False)
    assert "Traceback" in res.stderr and "CheckpointLoadError" in res.stderr  # --debug shows it


def test_loader_accepts_project_types_and_names_the_module(tmp_path):
    from lightning_moe.models import GPTConfig

    path = _lm_checkpoint(tmp_path / "lm.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"] = GPTConfig(vocab_size=40)  # a lightning_moe dataclass: allowlisted
    checkpoint["where"] = Path("runs/x")
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path, module=LanguageModelModule)
    assert loaded["config"] == GPTConfig(vocab_size=40) and loaded["where"] == Path("runs/x")
    with pytest.raises(CheckpointLoadError, match="not of MultitaskTranslationModule"):
        load_checkpoint(path, module=MultitaskTranslationModule)


def test_non_finite_weights_are_refused(tmp_path):
    path = _lm_checkpoint(tmp_path / "lm.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointLoadError, match=f"has NaN weights \\({key}\\)"):
        load_checkpoint(path)


def test_checkpoint_io_used_for_resume_refuses_foreign_objects(bad_checkpoints):
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointLoadError, match="could run code"):
        io.load_checkpoint(bad_checkpoints["evil"])
    with pytest.raises(CheckpointLoadError, match="is empty"):
        io.load_checkpoint(bad_checkpoints["empty"])
    assert not (bad_checkpoints["evil"].parent / "pwned").exists()
    assert "state_dict" in io.load_checkpoint(bad_checkpoints["wrong_kind"])


def test_directory_scan_refuses_foreign_objects_before_anything_loads(tmp_path):
    # A DCP-style directory whose .metadata pickle names os.system, and a legacy one with an evil common.pt.
    dcp = tmp_path / "dcp.ckpt"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    with pytest.raises(CheckpointLoadError, match=r"names the Python object posix\.system"):
        scan_checkpoint_directory(dcp)
    legacy = tmp_path / "legacy.ckpt"
    legacy.mkdir()
    torch.save({"x": _Payload(tmp_path / "pwned")}, legacy / "common.pt")
    with pytest.raises(CheckpointLoadError, match="could run code"):
        scan_checkpoint_directory(legacy)
    with pytest.raises(CheckpointLoadError, match="could run code"):
        load_checkpoint(legacy)
    assert not (tmp_path / "pwned").exists()
    # A real distributed checkpoint's metadata passes the restricted unpickler.
    import torch.distributed.checkpoint as dcp_api

    good = tmp_path / "good.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized: saving in one process"
        dcp_api.save({"w": torch.zeros(3), "step": 1}, checkpoint_id=str(good))
    torch.save({"loops": {}}, good / "meta.pt")
    scan_checkpoint_directory(good)


@pytest.fixture(scope="module")
def expert_parallel_checkpoint(tmp_path_factory) -> Path:
    """A distributed checkpoint directory of ExpertParallelStrategy (2 CPU processes, 3 steps)."""
    out = tmp_path_factory.mktemp("ep")
    with socket.socket() as sock:  # a rendezvous port of its own (other 2-process tests may run beside it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, str(ROOT / "tests" / "resume_job.py"), str(out), "--devices", "2", "--steps", "3"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.distributed
def test_consolidate_reads_an_expert_parallel_directory(expert_parallel_checkpoint, tmp_path, capsys):
    assert expert_parallel_checkpoint.is_dir()
    with pytest.raises(SystemExit) as exc:
        main(["consolidate", str(expert_parallel_checkpoint), str(tmp_path / "one.ckpt")])
    assert exc.value.code == 0 and "2 MoE layers, experts [4, 4]" in capsys.readouterr().out
    one = load_checkpoint(tmp_path / "one.ckpt", module=MultitaskTranslationModule)
    assert one["state_dict"]["model.encoder.0.ffn.experts.w1"].shape[0] == 4  # every expert, stacked
    assert not list(expert_parallel_checkpoint.parent.glob(".consolidate-*"))  # temporary folders removed


@pytest.mark.slow
@pytest.mark.distributed
def test_translate_reads_an_expert_parallel_directory(expert_parallel_checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["translate", "--ckpt", str(expert_parallel_checkpoint), "--tgt-lang", "de", "--max-length", "4", "Save"])
    captured = capsys.readouterr()
    assert exc.value.code == 0 and len(captured.out.splitlines()) == 1, captured.err
