"""LoadBalanceMonitor and ExpertLoadMetric: statistics, real loggers, DDP reduction, collapse, resume."""

import csv
import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.callbacks import (
    LOAD_STATISTICS,
    ExpertLoadMetric,
    LoadBalanceMonitor,
    LoadImbalanceWarning,
    expert_load_statistics,
)
from lightning_moe.moe import MoE, MoEStats

HIDDEN = 8
BATCH, SEQ = 4, 4  # 16 tokens per batch
TOKENS = BATCH * SEQ


class TinyMoEModel(L.LightningModule):
    """Two MoE layers with different expert counts (4 experts top-2, 8 experts top-1)."""

    def __init__(self, experts=(4, 8), top_k=(2, 1), num_samples=64, lr=0.05):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            MoE(HIDDEN, 16, e, top_k=k, backend="torch", z_loss_weight=1e-3)
            for e, k in zip(experts, top_k, strict=True)
        )
        self.head = nn.Linear(HIDDEN, HIDDEN)
        self.data = torch.randn(num_samples, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        h = batch[0]
        for moe in self.layers:
            h = h + moe(h)
        return self.head(h).pow(2).mean() + sum(moe.aux_loss for moe in self.layers)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.data), batch_size=BATCH)


class CollapsedModel(TinyMoEModel):
    """One top-1 layer of 8 experts whose frozen router sends every (positive) token to expert 0."""

    def __init__(self, num_samples=64):
        super().__init__(experts=(8,), top_k=(1,), num_samples=num_samples)
        self.data = self.data.abs() + 0.5
        router = self.layers[0].router
        with torch.no_grad():
            router.weight.fill_(-1.0)
            router.weight[0].fill_(1.0)
        router.weight.requires_grad_(False)


def _trainer(tmp_path, max_steps, callbacks, logger=False, **kwargs):
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _stats(counts, num_tokens, dropped=0.0, entropy=0.0, aux=0.0, z=0.0):
    counts = torch.tensor(counts, dtype=torch.float32)
    scalar = lambda v: torch.tensor(float(v))  # noqa: E731
    return MoEStats(counts, counts, scalar(num_tokens), scalar(dropped), scalar(entropy), scalar(aux), scalar(z))


# --------------------------------------------------------------------------- metric


def test_expert_load_statistics_by_hand():
    stats = expert_load_statistics(
        torch.tensor([6.0, 2.0, 0.0, 0.0]), *map(torch.tensor, (4.0, 2.0, 2.0, 3.0, 0.5, 2.0))
    )
    assert list(stats) == list(LOAD_STATISTICS)
    expected = {
        "cv": math.sqrt(6) / 2,  # mean 2, population variance (16 + 0 + 4 + 4) / 4
        "max_load": 3.0,
        "min_load": 0.0,
        "dead_fraction": 0.5,
        "drop_fraction": 2.0 / 8.0,
        "router_entropy": 0.5,
        "aux_loss": 1.5,
        "z_loss": 0.25,
    }
    for name, value in expected.items():
        assert stats[name].item() == pytest.approx(value), name
    empty = expert_load_statistics(torch.zeros(4), *torch.zeros(6))
    assert all(math.isnan(v.item()) for v in empty.values())


def test_metric_accumulates_and_validates():
    metric = ExpertLoadMetric(num_experts=4)
    metric.update(_stats([3, 1, 0, 0], num_tokens=2, dropped=1, entropy=1.0, aux=1.0, z=2.0))
    metric.update(_stats([3, 1, 0, 0], num_tokens=2, dropped=1, entropy=1.0, aux=2.0, z=4.0))
    stats = metric.compute()
    assert metric.tokens_per_expert.tolist() == [6, 2, 0, 0]
    assert stats["cv"].item() == pytest.approx(math.sqrt(6) / 2)
    assert stats["dead_fraction"].item() == 0.5
    assert stats["drop_fraction"].item() == pytest.approx(2 / 8)
    assert stats["router_entropy"].item() == pytest.approx(0.5)
    assert stats["aux_loss"].item() == pytest.approx(1.5)
    assert stats["z_loss"].item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(4,\).*num_experts=3"):
        metric.update(_stats([1, 1, 1], num_tokens=3))
    with pytest.raises(ValueError, match="num_experts=0"):
        ExpertLoadMetric(num_experts=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps=0"),
        ({"image_every_n_steps": -5}, "image_every_n_steps=-5"),
        ({"warn_dead_fraction": 1.5}, r"warn_dead_fraction=1.5 is not a fraction in \[0, 1\)"),
        ({"warn_cv": 0.0}, "warn_cv=0.0 is not positive"),
        ({"warn_patience": 0}, "warn_patience=0"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoadBalanceMonitor(**kwargs)


# --------------------------------------------------------------------------- real loggers


def _layer_keys(prefix="moe/"):
    names = ("layers.0", "layers.1")
    per_layer = {f"{prefix}{n}/{s}" for n in names for s in LOAD_STATISTICS}
    across = {f"{prefix}{kind}/{s}" for kind in ("worst", "worst_layer", "mean") for s in LOAD_STATISTICS}
    return per_layer | across


def test_tensorboard_logger_gets_scalars_image_and_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = LoadBalanceMonitor(log_every_n_steps=2, image_every_n_steps=4)
    _trainer(tmp_path, 4, [monitor], logger=logger).fit(TinyMoEModel())

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert _layer_keys() <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("moe/layers.0/cv")] == [2, 4]
    assert events.Scalars("moe/worst/cv")[-1].value == pytest.approx(
        max(monitor.last_statistics[n]["cv"] for n in ("layers.0", "layers.1")), rel=1e-6
    )
    assert "moe/load_heatmap" in tags["images"]
    image = events.Images("moe/load_heatmap")
    assert [e.step for e in image] == [4] and image[0].width > 100 and image[0].height > 100
    assert "moe/load_histogram" in tags["histograms"]


def test_csv_logger_gets_scalars_and_png(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = LoadBalanceMonitor(log_every_n_steps=2, image_every_n_steps=2, prefix="lb/")
    _trainer(tmp_path, 4, [monitor], logger=logger).fit(TinyMoEModel())

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert _layer_keys("lb/") <= set(rows[0])
    logged = [row for row in rows if row["lb/layers.1/cv"]]
    assert [int(row["step"]) for row in logged] == [2, 4]
    assert float(logged[-1]["lb/layers.1/dead_fraction"]) == pytest.approx(
        monitor.last_statistics["layers.1"]["dead_fraction"]
    )
    pngs = sorted(p.name for p in (Path(logger.log_dir) / "load_balance").glob("*.png"))
    assert pngs == ["step_00000002.png", "step_00000004.png"]
    assert (Path(logger.log_dir) / "load_balance" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_run_gets_scalars_image_and_histogram(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lb-test")
    monitor = LoadBalanceMonitor(log_every_n_steps=2, image_every_n_steps=2)
    _trainer(tmp_path, 4, [monitor], logger=logger).fit(TinyMoEModel())
    wandb.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2  # heatmaps at steps 2 and 4
    # wandb-core may still be writing the transaction log after `finish()` returns
    deadline = time.monotonic() + 30
    while True:
        history = _wandb_history(next(run_dir.glob("*.wandb")))
        logged = [row for row in history if "moe/layers.0/cv" in row]
        pictures = [row for row in history if "moe/load_heatmap/_type" in row]  # nested keys come flattened
        if (len(logged) >= 2 and len(pictures) >= 2) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [row["trainer/global_step"] for row in logged] == [2, 4]
    assert _layer_keys() <= set(logged[-1])
    assert logged[-1]["moe/layers.0/cv"] == pytest.approx(monitor.last_statistics["layers.0"]["cv"])
    assert [row["trainer/global_step"] for row in pictures] == [2, 4]
    assert pictures[-1]["moe/load_heatmap/_type"] == "image-file"
    assert (run_dir / "files" / pictures[-1]["moe/load_heatmap/path"]).is_file()
    assert pictures[-1]["moe/load_histogram/_type"] == "histogram"
    assert sum(pictures[-1]["moe/load_histogram/values"]) == 4 + 8  # one entry per (layer, expert)


def _wandb_history(path):
    """History rows of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log records in 32 KiB blocks."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too small for a header: skip to the next block
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


# --------------------------------------------------------------------------- semantics


def test_collapsed_router_reports_cv_dead_experts_and_warns_once(tmp_path):
    monitor = LoadBalanceMonitor(
        log_every_n_steps=2, image_every_n_steps=None, warn_cv=1.0, warn_dead_fraction=0.5, warn_patience=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, 8, [monitor]).fit(CollapsedModel())
    imbalance = [w for w in caught if issubclass(w.category, LoadImbalanceWarning)]
    assert len(imbalance) == 1, [str(w.message) for w in imbalance]
    message = str(imbalance[0].message)
    assert "'layers.0'" in message and "2 consecutive window(s)" in message and "(step 4)" in message
    assert "dead experts 87.5% > warn_dead_fraction=0.5" in message and "cv=2.65 > warn_cv=1.0" in message

    stats = monitor.last_statistics["layers.0"]
    capacity = math.ceil(TOKENS * 1 / 8 * 1.25)  # 3 < min_capacity=4
    assert stats["cv"] == pytest.approx(math.sqrt(7))
    assert stats["dead_fraction"] == pytest.approx(7 / 8)
    assert stats["max_load"] == pytest.approx(8.0)
    assert stats["min_load"] == 0.0
    assert stats["drop_fraction"] == pytest.approx((TOKENS - max(4, capacity)) / TOKENS)
    assert monitor.last_tokens_per_expert["layers.0"].tolist() == [2 * TOKENS] + [0] * 7


def test_window_spans_gradient_accumulation(tmp_path):
    monitor = LoadBalanceMonitor(log_every_n_steps=2, image_every_n_steps=None)
    trainer = _trainer(tmp_path, 2, [monitor], accumulate_grad_batches=2)
    trainer.fit(TinyMoEModel())
    assert trainer.global_step == 2
    # 2 optimizer steps x 2 micro-batches x 16 tokens x top_k
    assert monitor.last_tokens_per_expert["layers.0"].sum().item() == 4 * TOKENS * 2
    assert monitor.last_tokens_per_expert["layers.1"].sum().item() == 4 * TOKENS * 1


def test_state_survives_checkpoint_and_resume(tmp_path):
    kwargs = dict(log_every_n_steps=2, image_every_n_steps=None, warn_cv=1.0, warn_patience=2)
    first = LoadBalanceMonitor(**kwargs)
    trainer = _trainer(tmp_path, 3, [first])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadImbalanceWarning)  # one strike so far: no warning yet
        trainer.fit(CollapsedModel())
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert state["strikes"] == {"layers.0": 1} and state["window"][0].item() == TOKENS  # step 3's batch

    second = LoadBalanceMonitor(**kwargs)
    with pytest.warns(LoadImbalanceWarning, match=r"'layers.0'.*2 consecutive window\(s\).*\(step 4\)"):
        _trainer(tmp_path, 4, [second]).fit(CollapsedModel(), ckpt_path=ckpt)
    # the window of step 4 holds the batch before the checkpoint and the one after it
    assert second.last_tokens_per_expert["layers.0"][0].item() == 2 * TOKENS
    assert second.state_dict()["warned"] == ["layers.0"]


class _SkipsSecondLayer(TinyMoEModel):
    def training_step(self, batch, batch_idx):
        h = self.layers[0](batch[0])
        if batch_idx % 2 == 0:
            h = h + self.layers[1](h)
        return self.head(h).pow(2).mean()


def test_layer_that_did_not_run_is_not_counted_twice(tmp_path):
    monitor = LoadBalanceMonitor(log_every_n_steps=4, image_every_n_steps=None)
    _trainer(tmp_path, 4, [monitor]).fit(_SkipsSecondLayer())
    assert monitor.last_tokens_per_expert["layers.0"].sum().item() == 4 * TOKENS * 2
    assert monitor.last_tokens_per_expert["layers.1"].sum().item() == 2 * TOKENS * 1


# --------------------------------------------------------------------------- two processes


class _RecordLocalCounts(Callback):
    """Sums each rank's own counts and saves them with what the monitor reduced."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.local = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, moe in (("layers.0", pl_module.layers[0]), ("layers.1", pl_module.layers[1])):
            self.local[name] = self.local.get(name, 0) + moe.last_stats.tokens_per_expert.double()

    def on_train_end(self, trainer, pl_module):
        (monitor,) = [c for c in trainer.callbacks if isinstance(c, LoadBalanceMonitor)]
        torch.save(
            {"local": self.local, "reduced": monitor.last_tokens_per_expert, "stats": monitor.last_statistics},
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.distributed
def test_two_processes_log_counts_summed_over_ranks(tmp_path):
    torch.set_num_threads(1)
    logger = CSVLogger(tmp_path, name="ddp")
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        callbacks=[LoadBalanceMonitor(log_every_n_steps=4, image_every_n_steps=4), _RecordLocalCounts(str(tmp_path))],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyMoEModel(num_samples=32))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    (log_dir,) = (tmp_path / "ddp").glob("version_*")  # written by rank 0 of the spawned processes
    with open(log_dir / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("moe/layers.0/cv")]
    for name in ("layers.0", "layers.1"):
        local0, local1 = ranks[0]["local"][name], ranks[1]["local"][name]
        assert not torch.equal(local0, local1)  # the ranks saw different tokens
        for rank in ranks:
            assert torch.equal(rank["reduced"][name], local0 + local1)
        cv = (local0 + local1).std(correction=0) / (local0 + local1).mean()
        assert float(row[f"moe/{name}/cv"]) == pytest.approx(cv.item())
        assert ranks[1]["stats"][name] == ranks[0]["stats"][name]
    assert (log_dir / "load_balance" / "step_00000004.png").is_file()
