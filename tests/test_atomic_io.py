"""Atomic writes: a kill at any moment leaves the previous file or directory loadable, nothing in $TMPDIR."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_moe.io import (
    AtomicCheckpointIO,
    AtomicDirectory,
    atomic_directory,
    atomic_file,
    atomic_save,
    recover_directory,
)


def test_atomic_file_replaces_and_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    with atomic_file(path, "w") as f:
        f.write("one")
    with atomic_file(path, "w") as f:
        f.write("two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_atomic_file_exception_keeps_old(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(path) as f:
        f.write(b"new, half written")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_file_rejects_read_mode(tmp_path):
    with pytest.raises(ValueError, match="mode='rb'"), atomic_file(tmp_path / "x", "rb"):
        pass


def test_checkpoint_io_roundtrip(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 7}
    io.save_checkpoint(state, tmp_path / "ckpts" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(state, tmp_path / "x.ckpt", storage_options={"a": 1})


# A child process saves checkpoint v1, then starts saving v2 and is killed (SIGKILL, like `kill -9`)
# while the temporary file is partly written, or just before the rename.
_KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import torch
    from lightning_moe.io import AtomicCheckpointIO

    path, where = sys.argv[1], sys.argv[2]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1, "w": torch.full((1000,), 1.0)}, path)
    big = {"version": 2, "w": torch.full((8_000_000,), 2.0)}  # 32 MB
    folder = os.path.dirname(path)

    def kill_when_partial():
        while True:
            for name in os.listdir(folder):
                if name.endswith(".tmp") and 0 < os.path.getsize(os.path.join(folder, name)) < 32_000_000:
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0002)

    if where == "partial":
        threading.Thread(target=kill_when_partial, daemon=True).start()
    elif where == "before_rename":
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    io.save_checkpoint(big, path)
    print("finished without being killed")
    """
)


@pytest.mark.parametrize("where", ["partial", "before_rename"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, where):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    path = ckpts / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, str(path), where], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    loaded = torch.load(path, weights_only=True)
    assert loaded["version"] == 1 and torch.equal(loaded["w"], torch.full((1000,), 1.0))
    assert list(tmpdir.iterdir()) == []  # nothing left in $TMPDIR
    # The partial temporary file sits beside the checkpoint, hidden; the next save leaves only its own file.
    AtomicCheckpointIO().save_checkpoint({"version": 3}, path)
    assert torch.load(path, weights_only=True)["version"] == 3


def test_atomic_directory_replaces_whole(tmp_path):
    dest = tmp_path / "step=1.ckpt"
    with atomic_directory(dest) as staging:
        atomic_save({"v": 1}, staging / "a.pt")
        atomic_save({"v": 1}, staging / "b.pt")
    assert sorted(p.name for p in dest.iterdir()) == ["a.pt", "b.pt"]
    with atomic_directory(dest) as staging:
        (staging / "sub").mkdir()
        atomic_save({"v": 2}, staging / "sub" / "c.pt")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["sub", "sub/c.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt"]


def test_atomic_directory_exception_keeps_old(tmp_path):
    dest = tmp_path / "d"
    with atomic_directory(dest) as staging:
        (staging / "x").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(dest) as staging:
        (staging / "x").write_text("new")
        raise KeyboardInterrupt
    assert (dest / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_interrupted_swap_is_recovered(tmp_path):
    # A kill between the two renames of a non-Linux swap: the previous version waits at .d.old.
    dest = tmp_path / "d"
    old = tmp_path / ".d.old"
    old.mkdir()
    (old / "x").write_text("previous")
    target = AtomicDirectory(dest)
    assert recover_directory(dest) and (dest / "x").read_text() == "previous"
    assert not recover_directory(dest)
    # begin() recovers too, and clears a stale staging directory of a killed writer.
    os.rename(dest, old)
    target.staging.mkdir()
    (target.staging / "stale").write_text("half")
    staging = target.begin()
    assert (dest / "x").read_text() == "previous" and list(staging.iterdir()) == []
    (staging / "x").write_text("new")
    target.commit()
    assert (dest / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_commit_refuses_to_replace_a_file(tmp_path):
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"single-file checkpoint")
    target = AtomicDirectory(dest)
    target.begin()
    with pytest.raises(NotADirectoryError, match="is a file"):
        target.commit()
    assert dest.read_bytes() == b"single-file checkpoint"
    with pytest.raises(FileNotFoundError, match="nothing to commit"):
        AtomicDirectory(tmp_path / "never").commit()


def test_atomic_path_for_writers_that_want_a_file_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_moe.io import atomic_path

    dest = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(dest))
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))
        raise RuntimeError("killed mid-way")
    assert torch.equal(load_file(str(dest))["w"], torch.zeros(2))  # the old file is untouched
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent  # beside the destination, not in $TMPDIR
        save_file({"w": torch.ones(2)}, str(tmp))
    assert torch.equal(load_file(str(dest))["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
