"""Exact resume: ``kill -9`` mid-run, ``fit --ckpt_path last.ckpt``, and the loss curve is the uninterrupted one, bit for bit.

Each run is ``tests/resume_job.py`` in its own process group (the kill takes every rank at once).
The metrics files are compared byte for byte: same steps, same losses, no duplicated or missing rows.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "resume_job.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(out: Path, *args: str) -> subprocess.Popen:
    # Each job its own rendezvous port: two jobs run side by side, and a killed job's port may linger.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    return subprocess.Popen(
        [sys.executable, str(JOB), str(out), *args], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out


def _train_losses(path: Path) -> list[tuple[str, str]]:
    return [(row["step"], row["train/loss"]) for row in csv.DictReader(path.open()) if row["train/loss"]]


def _kill_and_resume(tmp_path: Path, kill_at: int, *extra: str) -> tuple[Path, Path]:
    full, part = tmp_path / "full", tmp_path / "part"
    uninterrupted = _start(full, *extra)  # runs beside the killed one: 2 cores
    killed = _start(part, "--kill-at", str(kill_at), *extra)
    code, out = _finish(killed)
    assert code == -signal.SIGKILL, out[-3000:]
    code, out = _finish(uninterrupted)
    assert code == 0, out[-3000:]
    last = part / "checkpoints" / "last.ckpt"
    code, out = _finish(_start(part, "--ckpt-path", str(last), *extra))
    assert code == 0, out[-3000:]
    return full / "metrics.csv", part / "metrics.csv"


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_repeats_the_run_exactly(tmp_path):
    # Checkpoints every 3 steps, an epoch is 12 steps: the kill at step 8 resumes from step 6, mid-epoch,
    # and the resumed run crosses the epoch boundary and a validation.
    full, part = _kill_and_resume(tmp_path, kill_at=8)
    assert full.read_bytes() == part.read_bytes()  # every row, every value, no duplicates
    steps = [step for step, _ in _train_losses(part)]
    assert steps == [str(s) for s in range(20)]


@pytest.mark.slow
@pytest.mark.distributed
def test_kill9_then_resume_under_expert_parallel_on_two_processes(tmp_path):
    full, part = _kill_and_resume(tmp_path, 8, "--devices", "2", "--dump-batches")
    assert _train_losses(full) == _train_losses(part)
    assert full.read_bytes() == part.read_bytes()
    # The 2-rank sampler dealt whole length buckets: rank r's i-th batch of an epoch is batch r + 2i of the
    # single-device epoch (the same draws, deterministic per epoch and seed).
    from resume_job import datamodule

    from lightning_moe.data.batching import DistributedBatchSampler

    dm = datamodule(tokenizer=None)
    dm.setup("fit")
    single = dm.train_dataloader()
    assert isinstance(single.sampler, DistributedBatchSampler) and single.sampler.num_replicas == 1
    source = single.sampler.source
    for rank in (0, 1):
        seen = torch.load(tmp_path / "full" / f"batches_rank{rank}.pt", weights_only=True)
        for (epoch, index), src_ids in seen.items():
            expected = single.collate_fn(single.dataset[source.batches(epoch)[rank + 2 * index]])
            assert torch.equal(src_ids, expected["src_ids"]), (rank, epoch, index)
        assert len(seen) == 20
