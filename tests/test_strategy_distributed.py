"""ExpertParallelStrategy end to end with 2 processes (gloo, CPU): equivalence, resharding, errors.

The proof of the gradient rule: the same model, data and seed trained with plain Lightning in one
process and with ExpertParallelStrategy in 2 processes (EP=2, and EP=1 = expert data parallel over
both ranks) give the same losses and parameters, with and without gradient accumulation and
clipping. Checkpoints written at one expert-parallel size resume at another with identical expert
weights and optimizer state, and continue the same loss curve.

This file is also the worker script: ``python tests/test_strategy_distributed.py '<json>'`` runs
one training; Lightning's launcher re-runs that command for rank 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_moe.strategy  # noqa: F401  (registers "expert_parallel")
from lightning_moe.moe import MoE, moe_layers
from lightning_moe.strategy import ExpertParallelStrategy, consolidate_checkpoint

VOCAB, HIDDEN, SEQ, NUM_SEQ = 32, 16, 8, 32
GLOBAL_BATCH = 8


class TinyMoELM(L.LightningModule):
    """Embedding, two MoE layers (the second with a shared expert), LayerNorm, head."""

    def __init__(self, num_experts: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        kwargs = dict(capacity_factor=None, aux_loss_weight=0.0, random_token_selection=False, backend="torch")
        self.moes = nn.ModuleList(
            [
                MoE(HIDDEN, 24, num_experts, top_k=2, **kwargs),
                MoE(HIDDEN, 20, num_experts, top_k=2, num_shared_experts=1, activation="gelu", **kwargs),
            ]
        )
        with torch.no_grad():
            for moe in self.moes:
                moe.router.weight.normal_(std=0.5)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.step_losses: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for moe in self.moes:
            x = x + moe(x)
        return self.head(self.norm(x))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.step_losses.append(loss.detach())
        return loss

    def train_dataloader(self):
        # Rank r takes sequences r, r + W, ...: global batch b is sequences [8b, 8b + 8) at any W.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = Subset(dataset(), list(range(rank, NUM_SEQ, world)))
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randint(VOCAB, (NUM_SEQ, SEQ + 1), generator=g))


class _Recorder(L.Callback):
    """Writes (rank 0) the loss curve, and every rank's restored expert state at train start."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        # After checkpoint restore: this rank's expert rows and their optimizer state.
        rows = {}
        opt = trainer.optimizers[0]
        for name, layer in moe_layers(pl_module):
            for w in ("w1", "w2", "w3"):
                param = getattr(layer.experts, w)
                if param is None:
                    continue
                state = opt.state.get(param, {})
                rows[f"{name}.experts.{w}"] = {
                    "offset": layer.expert_offset,
                    "weight": param.detach().clone(),
                    "exp_avg": state["exp_avg"].clone() if "exp_avg" in state else None,
                    "exp_avg_sq": state["exp_avg_sq"].clone() if "exp_avg_sq" in state else None,
                }
        torch.save(rows, self.out / f"restored_rank{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # The first update's gradients, after the strategy's reduction: AdamW is blind to a constant
        # gradient scale, so the gradient rule is checked on the gradients themselves.
        if trainer.global_step != 0:
            return
        offsets = {}
        for name, layer in moe_layers(pl_module):
            for w in ("w1", "w2", "w3"):
                offsets[f"{name}.experts.{w}"] = layer.expert_offset
        grads = {n: (offsets.get(n, 0), p.grad.detach().clone()) for n, p in pl_module.named_parameters()}
        torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        losses = torch.stack(pl_module.step_losses) if pl_module.step_losses else torch.zeros(0)
        losses = trainer.strategy.reduce(losses, reduce_op="mean")
        if trainer.is_global_zero:
            torch.save(losses, self.out / "losses.pt")


def run_worker(cfg: dict) -> None:
    torch.set_num_threads(1)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    model = TinyMoELM(num_experts=cfg.get("num_experts", 4))
    devices = cfg["devices"]
    if cfg["ep"] is None:
        strategy = "auto"
    elif isinstance(cfg["ep"], str):
        strategy = cfg["ep"]  # a registered name
    else:
        strategy = ExpertParallelStrategy(expert_parallel_size=cfg["ep"])
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=cfg.get("epochs", 2),
        accumulate_grad_batches=cfg.get("accumulate", 1),
        gradient_clip_val=cfg.get("clip"),
        callbacks=[ckpt, _Recorder(out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=cfg.get("resume"))
    if trainer.is_global_zero:
        # Teardown gathered the experts back: the module is whole on every rank.
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "final.pt")


def launch(cfg: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one training; ``cfg["launcher"] == "torchrun"`` starts it under torchrun, else Lightning launches."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    prefix = [sys.executable]
    if cfg.get("launcher") == "torchrun":
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg['devices']}"]
    return subprocess.run(
        [*prefix, os.path.abspath(__file__), json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cfg["out"],
    )


def train(cfg: dict) -> Path:
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    proc = launch(cfg)
    assert proc.returncode == 0, f"worker failed ({cfg}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def assert_same_params(a: dict, b: dict, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Shared trainings: the one-process reference and the 2-process runs (each run once)."""
    root = tmp_path_factory.mktemp("ep")
    cfgs = {
        "ref": {"devices": 1, "ep": None},
        "ep2": {"devices": 2, "ep": 2},
        "ep1x2": {"devices": 2, "ep": 1, "launcher": "torchrun"},
        # 4 processes on CPU: EP groups {0,1} {2,3}, EDP groups {0,2} {1,3}: both reductions at once.
        "ep2x2": {"devices": 4, "ep": 2},
    }
    return {name: train({**cfg, "out": str(root / name)}) for name, cfg in cfgs.items()}


def _load(run: Path, what: str):
    return torch.load(run / what, weights_only=True)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ep2", "ep1x2", "ep2x2"])
def test_two_processes_match_one_process(runs, name):
    ref_losses = _load(runs["ref"], "losses.pt")
    assert ref_losses.numel() == 2 * NUM_SEQ // GLOBAL_BATCH
    torch.testing.assert_close(_load(runs[name], "losses.pt"), ref_losses, rtol=1e-4, atol=1e-5)
    assert_same_params(_load(runs[name], "final.pt"), _load(runs["ref"], "final.pt"))
    assert_same_first_gradients(runs[name], runs["ref"])


def assert_same_first_gradients(run: Path, ref: Path) -> None:
    """Every rank's gradients of the first step (expert shards at their offsets) equal one process's."""
    ref_grads = _load(ref, "grads_rank0.pt")
    ranks = sorted(run.glob("grads_rank*.pt"))
    assert ranks
    for file in ranks:
        for key, (offset, grad) in torch.load(file, weights_only=True).items():
            expected = ref_grads[key][1][offset : offset + grad.shape[0]]
            torch.testing.assert_close(
                grad, expected, rtol=1e-5, atol=1e-7, msg=lambda m, k=key, f=file.name: f"{f} {k}: {m}"
            )


@pytest.mark.distributed
def test_equivalence_with_accumulation_and_clipping(tmp_path):
    cfg = {"accumulate": 2, "clip": 0.05, "epochs": 2}
    ref = train({**cfg, "devices": 1, "ep": None, "out": str(tmp_path / "ref")})
    ep2 = train({**cfg, "devices": 2, "ep": 2, "out": str(tmp_path / "ep2")})
    torch.testing.assert_close(_load(ep2, "losses.pt"), _load(ref, "losses.pt"), rtol=1e-4, atol=1e-5)
    assert_same_params(_load(ep2, "final.pt"), _load(ref, "final.pt"))
    assert_same_first_gradients(ep2, ref)


def _check_restored(resumed: Path, source_ckpt: Path, world: int, tmp_path: Path) -> None:
    """Every rank's restored expert rows and AdamW moments equal the checkpoint's."""
    full = consolidate_checkpoint(source_ckpt, tmp_path / f"consolidated-{resumed.name}.ckpt")
    state_dict = full["state_dict"]
    opt_state = full["optimizer_states"][0]["state"]
    index_of = (
        {key: idx for idx, key in full["expert_parallel"]["optimizer_params"][0].items()}
        if ("expert_parallel" in full)
        else None
    )
    for rank in range(world):
        restored = torch.load(resumed / f"restored_rank{rank}.pt", weights_only=True)
        assert restored, "no expert rows restored"
        for key, entry in restored.items():
            rows = slice(entry["offset"], entry["offset"] + entry["weight"].shape[0])
            torch.testing.assert_close(entry["weight"], state_dict[key][rows], rtol=0, atol=0)
            if index_of is not None:
                saved = opt_state[index_of[key]]
                torch.testing.assert_close(entry["exp_avg"], saved["exp_avg"][rows], rtol=0, atol=0)
                torch.testing.assert_close(entry["exp_avg_sq"], saved["exp_avg_sq"][rows], rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("source", "devices", "ep"),
    [("ep2", 1, 1), ("ep2", 2, 2), ("ep1x2", 2, 2), ("ref", 2, 2)],
    ids=["ep2-to-ep1", "ep2-to-ep2", "ep1-to-ep2", "plain-file-to-ep2"],
)
def test_resume_reshards_and_continues_the_loss_curve(runs, tmp_path, source, devices, ep):
    ckpt = runs[source] / "ckpts" / "epoch=0-step=4.ckpt"
    assert ckpt.exists()
    resumed = train({"devices": devices, "ep": ep, "resume": str(ckpt), "out": str(tmp_path / "resumed")})
    ref_losses = _load(runs["ref"], "losses.pt")
    torch.testing.assert_close(_load(resumed, "losses.pt"), ref_losses[4:], rtol=1e-4, atol=1e-5)
    assert_same_params(_load(resumed, "final.pt"), _load(runs["ref"], "final.pt"))
    if source != "ref":
        _check_restored(resumed, ckpt, devices, tmp_path)


@pytest.mark.distributed
def test_registered_spawn_name_trains_and_returns_the_whole_model(runs, tmp_path):
    # Default expert_parallel_size: 2 (divides the world size 2 and num_experts 4).
    out = train({"devices": 2, "ep": "expert_parallel_spawn", "epochs": 1, "out": str(tmp_path)})
    assert (out / "ckpts" / "epoch=0-step=4.ckpt" / "experts-00001-of-00002.pt").exists()
    torch.testing.assert_close(_load(out, "losses.pt"), _load(runs["ref"], "losses.pt")[:4], rtol=1e-4, atol=1e-5)
    # The spawn launcher hands rank 0's module back to the parent: teardown gathered every expert.
    final = _load(out, "final.pt")
    assert final["moes.0.experts.w1"].shape[0] == 4


@pytest.mark.distributed
def test_checkpoint_with_missing_shard_fails_on_every_rank(runs, tmp_path):
    ckpt = tmp_path / "broken.ckpt"
    shutil.copytree(runs["ep2"] / "ckpts" / "epoch=0-step=4.ckpt", ckpt)
    (ckpt / "experts-00001-of-00002.pt").unlink()
    proc = launch({"devices": 2, "ep": 2, "resume": str(ckpt), "out": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert "expert shard experts-00001-of-00002.pt listed in" in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("ep", "num_experts", "message"),
    [
        (3, 6, "world size 2 is not divisible by expert_parallel_size=3"),
        (2, 3, "has num_experts=3, which is not divisible by expert_parallel_size=2"),
    ],
)
def test_bad_configuration_fails_on_every_rank_without_hanging(tmp_path, ep, num_experts, message):
    proc = launch({"devices": 2, "ep": ep, "num_experts": num_experts, "out": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
