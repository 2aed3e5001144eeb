"""ExpertParallelStrategy end to end with 2 and 4 CPU processes (gloo): equivalence, checkpoints, errors.

The proof of the gradient rule: the same model, data and seed trained with plain Lightning in one
process and with ExpertParallelStrategy in 2 or 4 processes (FSDP with EP=2 and EP=1, DDP with
EP=2, and a 2x2 mesh: EP 2 x expert-data-parallel 2) give the same losses, first gradients and
final parameters over 8 AdamW steps with gradient accumulation and clipping (dropless, aux weight
0). Checkpoints written at one layout resume at another with identical weights and Adam moments
and continue the same loss curve; the legacy expert-sharded format resumes too.

This file is also the worker script: ``python tests/test_strategy_distributed.py '<json>'`` runs
one training; Lightning's launcher re-runs that command for the other ranks.
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
from dist_utils import shut_down
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_moe.moe import MoE
from lightning_moe.strategy import ExpertParallelStrategy, read_full_checkpoint

VOCAB, HIDDEN, SEQ, NUM_SEQ = 32, 16, 8, 64
GLOBAL_BATCH = 8
ACCUMULATE = 2
STEPS_PER_EPOCH = NUM_SEQ // GLOBAL_BATCH // ACCUMULATE  # 4 optimizer steps
DATA = Path(__file__).parent / "data"


class TinyMoELM(L.LightningModule):
    """Embedding, two MoE layers (the second with a shared expert), LayerNorm, head."""

    def __init__(self, num_experts: int = 4, lr: float = 1e-2, aux: bool = False, virtual_ranks: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        kwargs = dict(capacity_factor=None, aux_loss_weight=0.0, random_token_selection=False, backend="torch")
        if aux:  # capacity (drops tokens) and the load-balancing and z losses, all computed per rank
            kwargs.update(capacity_factor=1.0, min_capacity=1, aux_loss_weight=0.05, z_loss_weight=0.01)
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
        if self.hparams.aux:
            loss = loss + sum(moe.aux_loss for moe in self.moes)
        self.step_losses.append(loss.detach())
        return loss

    def predict_step(self, batch, batch_idx):
        (tokens,) = batch
        return self(tokens).argmax(-1)

    def train_dataloader(self):
        # Rank r takes sequences r, r + W, ...: global batch b is sequences [8b, 8b + 8) at any W.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        virtual = self.hparams.virtual_ranks
        if virtual > 1:
            # One process playing `virtual` ranks: global batch b becomes `virtual` micro-batches, the
            # one rank r would see in turn (accumulated), so per-rank capacity and aux losses match.
            per = GLOBAL_BATCH // virtual
            batches = [
                [GLOBAL_BATCH * b + r + virtual * i for i in range(per)]
                for b in range(NUM_SEQ // GLOBAL_BATCH)
                for r in range(virtual)
            ]
            return DataLoader(dataset(), batch_sampler=batches)
        data = Subset(dataset(), list(range(rank, NUM_SEQ, world)))
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randint(VOCAB, (NUM_SEQ, SEQ + 1), generator=g))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _full_optimizer_state(trainer, module) -> dict[str, dict[str, torch.Tensor]]:
    """``{parameter name: {exp_avg, exp_avg_sq}}`` as whole tensors (a collective under the strategy)."""
    opt = trainer.optimizers[0]
    out = {}
    for name, param in module.named_parameters():
        state = opt.state.get(param, {})
        out[name] = {k: _full(v) for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}
    return out


class _Recorder(L.Callback):
    """Writes (rank 0) losses, first gradients, restored state at train start and the final parameters."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        # After a checkpoint restore: the whole weights and Adam moments every rank holds shards of.
        weights = {n: _full(p) for n, p in pl_module.named_parameters()}
        moments = _full_optimizer_state(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save({"weights": weights, "moments": moments}, self.out / "restored.pt")
        if isinstance(trainer.strategy, ExpertParallelStrategy):
            # Each rank's bytes of parameters: its own shards.
            local = {
                n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
                for n, p in pl_module.named_parameters()
            }
            torch.save(sum(t.numel() for t in local.values()), self.out / f"local_numel_rank{trainer.global_rank}.pt")
            torch.save(local, self.out / f"local_rank{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # The first update's gradients after the strategy's reduction (before clipping): AdamW is
        # blind to a constant gradient scale, so the gradient rule is checked on the gradients.
        if trainer.global_step != 0:
            return
        grads = {n: _full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}
        if trainer.is_global_zero:
            torch.save(grads, self.out / "grads.pt")

    def on_train_end(self, trainer, pl_module):
        if isinstance(trainer.strategy, ExpertParallelStrategy):
            # Each rank's bytes of optimizer state (Adam moments): its shards.
            opt = trainer.optimizers[0]
            moments = {
                n: sum((v.to_local() if hasattr(v, "to_local") else v).numel() for k, v in opt.state[p].items()
                       if k in ("exp_avg", "exp_avg_sq"))
                for n, p in pl_module.named_parameters()
            }  # fmt: skip
            torch.save(moments, self.out / f"local_moments_rank{trainer.global_rank}.pt")
        losses = torch.stack(pl_module.step_losses) if pl_module.step_losses else torch.zeros(0)
        losses = trainer.strategy.reduce(losses, reduce_op="mean")
        final = {n: _full(p) for n, p in pl_module.named_parameters()}
        if trainer.is_global_zero:
            torch.save(losses, self.out / "losses.pt")
            torch.save(final, self.out / "final.pt")


def run_worker(cfg: dict) -> None:
    torch.set_num_threads(1)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("rank_seeds"):  # every rank initialises differently: replicas must still start equal
        L.seed_everything(int(os.environ.get("LOCAL_RANK", 0)) + 7, verbose=False)
    else:
        L.seed_everything(0, verbose=False)
    model = TinyMoELM(
        num_experts=cfg.get("num_experts", 4), aux=cfg.get("aux", False), virtual_ranks=cfg.get("virtual", 1)
    )
    if cfg["ep"] is None:
        strategy = "auto"
    elif isinstance(cfg["ep"], str):
        strategy = cfg["ep"]  # a registered name
    else:
        strategy = ExpertParallelStrategy(expert_parallel_size=cfg["ep"], data_parallel=cfg.get("mode", "fsdp"))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "ckpts", save_top_k=-1, every_n_epochs=1, save_last=bool(cfg.get("kill_in_save"))
    )
    if cfg.get("kill_in_save"):
        _kill_while_replacing_last()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        strategy=strategy,
        precision=cfg.get("precision", "32-true"),
        max_epochs=cfg.get("epochs", 2),
        accumulate_grad_batches=ACCUMULATE * cfg.get("virtual", 1),
        gradient_clip_val=cfg.get("clip", 0.05),
        callbacks=[ckpt, _Recorder(out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        use_distributed_sampler=bool(cfg.get("predict")),  # training data is split by train_dataloader
    )
    if cfg.get("predict"):
        # Uneven predict batches per rank (5 sequences over 2 ranks with Lightning's unpadded sampler).
        loader = DataLoader(TensorDataset(dataset().tensors[0][:5]), batch_size=1)
        predictions = trainer.predict(model, dataloaders=loader)
        torch.save(len(predictions), out / f"predictions_rank{trainer.global_rank}.pt")
        shut_down()
        return
    trainer.fit(model, ckpt_path=cfg.get("resume"))
    shut_down()


def _kill_while_replacing_last() -> None:
    """``kill -9`` this process halfway through the fourth distributed save: epoch 1's ``last.ckpt``."""
    import signal

    import torch.distributed.checkpoint as dcp

    save, calls = dcp.save, []

    def dying_save(state, checkpoint_id=None, **kwargs):
        calls.append(checkpoint_id)
        if len(calls) == 4:  # epoch 0: epoch=0-step=4.ckpt, last.ckpt; epoch 1: epoch=1-step=8.ckpt, last.ckpt
            save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are written, the metadata is not
            (Path(checkpoint_id) / "meta.pt").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(state, checkpoint_id=checkpoint_id, **kwargs)

    dcp.save = dying_save


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


def train(cfg: dict, timeout: float = 300) -> Path:
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    proc = launch(cfg, timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({cfg}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def assert_same(a: dict, b: dict, atol: float = 1e-5, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def _load(run: Path, what: str):
    return torch.load(run / what, weights_only=True)


# ------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Shared trainings: the one-process reference and the parallel runs (each run once)."""
    root = tmp_path_factory.mktemp("ep")
    cfgs = {
        "ref": {"devices": 1, "ep": None},
        "fsdp_ep2": {"devices": 2, "ep": 2},
        "fsdp_ep1": {"devices": 2, "ep": 1, "launcher": "torchrun"},
        "ddp_ep2": {"devices": 2, "ep": 2, "mode": "ddp"},
        # 4 processes: EP groups {0,1} {2,3}, expert-data-parallel groups {0,2} {1,3}.
        "fsdp_2x2": {"devices": 4, "ep": 2},
    }
    return {name: train({**cfg, "out": str(root / name)}) for name, cfg in cfgs.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp_ep2", "fsdp_ep1", "ddp_ep2", "fsdp_2x2"])
def test_parallel_runs_match_one_process(runs, name):
    ref_losses = _load(runs["ref"], "losses.pt")
    assert ref_losses.numel() == 2 * NUM_SEQ // GLOBAL_BATCH  # 16 batches, 8 AdamW steps
    torch.testing.assert_close(_load(runs[name], "losses.pt"), ref_losses, rtol=0, atol=1e-5)
    assert_same(_load(runs[name], "grads.pt"), _load(runs["ref"], "grads.pt"), atol=1e-6, rtol=1e-5)
    assert_same(_load(runs[name], "final.pt"), _load(runs["ref"], "final.pt"))


@pytest.mark.distributed
def test_with_capacity_and_aux_loss_two_ranks_equal_one_process_playing_both(tmp_path):
    """What holds with capacity and aux losses on: each rank computes capacity, the load-balancing
    loss and the z-loss from its own tokens (DeepSpeed's semantics), so EP=2 on 2 ranks trains as
    one process that runs each rank's share as a separate accumulated micro-batch, not as one
    process on the whole global batch."""
    ep2 = train({"devices": 2, "ep": 2, "aux": True, "out": str(tmp_path / "ep2")})
    one = train({"devices": 1, "ep": None, "aux": True, "virtual": 2, "out": str(tmp_path / "one")})
    whole = train({"devices": 1, "ep": None, "aux": True, "out": str(tmp_path / "whole")})
    # per-rank losses: rank r's micro-batch m is the virtual run's micro-batch 2 m + r
    ep2_losses, one_losses = _load(ep2, "losses.pt"), _load(one, "losses.pt").view(-1, 2).mean(1)
    torch.testing.assert_close(ep2_losses, one_losses, rtol=0, atol=1e-5)
    assert_same(_load(ep2, "final.pt"), _load(one, "final.pt"))
    # ... and differs from one process on the whole global batch (capacity and aux over 8 sequences).
    diff = (_load(ep2, "final.pt")["moes.0.router.weight"] - _load(whole, "final.pt")["moes.0.router.weight"]).abs()
    assert diff.max() > 1e-4


@pytest.mark.distributed
def test_each_rank_stores_one_nth_of_the_model(runs):
    """Parameters and Adam moments: with "fsdp" each of N ranks holds 1/N of the dense ones and 1/N of
    the experts (P x D = N); with "ddp" the dense ones are whole and the experts split over P."""
    final = _load(runs["ref"], "final.pt")
    total = {"dense": 0, "expert": 0}
    for name, value in final.items():
        total["expert" if ".experts." in name else "dense"] += value.numel()

    def split(table: dict) -> dict:
        out = {"dense": 0, "expert": 0}
        for name, numel in table.items():
            out["expert" if ".experts." in name else "dense"] += numel
        return out

    for name, world in (("fsdp_ep2", 2), ("fsdp_ep1", 2), ("fsdp_2x2", 4)):
        for rank in range(world):
            params = split({n: t.numel() for n, t in _load(runs[name], f"local_rank{rank}.pt").items()})
            moments = split(_load(runs[name], f"local_moments_rank{rank}.pt"))
            print(f"{name} rank {rank}: parameters {params}, Adam moments {moments} of {total}")
            assert params == {k: v // world for k, v in total.items()}, (name, rank)
            assert moments == {k: 2 * v // world for k, v in total.items()}, (name, rank)
    for rank in range(2):
        params = split({n: t.numel() for n, t in _load(runs["ddp_ep2"], f"local_rank{rank}.pt").items()})
        assert params == {"dense": total["dense"], "expert": total["expert"] // 2}


def _expected_restore(ckpt: Path) -> tuple[dict, dict]:
    """The checkpoint's whole weights and Adam moments, read without any process group."""
    full = read_full_checkpoint(ckpt)
    state = full["optimizer_states"][0]
    names = [n for n, _ in TinyMoELM().named_parameters()]  # the optimizer's parameter order
    moments = {names[i]: {k: v for k, v in s.items() if k != "step"} for i, s in state["state"].items()}
    return full["state_dict"], moments


def assert_restored(run: Path, ckpt: Path) -> None:
    """What ``run`` restored at train start (rank 0, whole tensors) is ``ckpt``'s, bit for bit."""
    weights, moments = _expected_restore(ckpt)
    restored = _load(run, "restored.pt")
    assert_same(restored["weights"], weights, atol=0)
    for name, states in moments.items():
        assert_same(restored["moments"][name], states, atol=0)


@pytest.mark.distributed
def test_checkpoints_reshard_and_continue_the_loss_curve(runs, tmp_path):
    ref_losses = _load(runs["ref"], "losses.pt")
    half = ref_losses.numel() // 2
    # 2x2 mesh on 4 ranks -> FSDP EP=2 on 2 ranks -> DDP EP=1 on 1 rank.
    ckpt = runs["fsdp_2x2"] / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    step1 = train({"devices": 2, "ep": 2, "resume": str(ckpt), "out": str(tmp_path / "to_ep2")})
    assert_restored(step1, ckpt)
    torch.testing.assert_close(_load(step1, "losses.pt"), ref_losses[half:], rtol=0, atol=1e-5)
    assert_same(_load(step1, "final.pt"), _load(runs["ref"], "final.pt"))
    # The checkpoint the EP=2 run wrote at its end resumes at one process (max_epochs 3: one more epoch).
    second = step1 / "ckpts" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
    step2 = train({"devices": 1, "ep": 1, "mode": "ddp", "resume": str(second), "epochs": 3,
                   "out": str(tmp_path / "to_one")})  # fmt: skip
    assert_restored(step2, second)


@pytest.mark.distributed
def test_eight_ranks_resume_at_two(tmp_path):
    """8 processes (EP=4 x EDP=2; the shared expert [1, 16, 20] is split on dim 1: 20 does not divide
    by 8) write a checkpoint that 2 processes (EP=2) restore bit for bit."""
    big = train({"devices": 8, "ep": 4, "epochs": 1, "out": str(tmp_path / "w8")}, timeout=600)
    ckpt = big / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    small = train({"devices": 2, "ep": 2, "resume": str(ckpt), "out": str(tmp_path / "w2")})
    assert_restored(small, ckpt)


@pytest.mark.distributed
def test_plain_and_legacy_checkpoints_resume(runs, tmp_path):
    ref_losses = _load(runs["ref"], "losses.pt")
    half = ref_losses.numel() // 2
    # A single-device Lightning checkpoint resumes under the strategy.
    plain = runs["ref"] / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    resumed = train({"devices": 2, "ep": 2, "resume": str(plain), "out": str(tmp_path / "plain")})
    torch.testing.assert_close(_load(resumed, "losses.pt"), ref_losses[half:], rtol=0, atol=1e-5)
    assert_same(_load(resumed, "final.pt"), _load(runs["ref"], "final.pt"))
    # The legacy expert-sharded format (written by the DDP-based strategy before 2026-12-08, EP=2):
    # its weights and expert moments, as that code consolidated them, are what every rank restores.
    legacy = DATA / "legacy_ep2_step4.ckpt"
    expected = torch.load(DATA / "legacy_ep2_step4_expected.pt", weights_only=True)
    resumed = train({"devices": 2, "ep": 2, "resume": str(legacy), "out": str(tmp_path / "legacy")})
    restored = _load(resumed, "restored.pt")
    assert_same(restored["weights"], expected["state_dict"], atol=0)
    names = [n for n, _ in TinyMoELM().named_parameters()]
    for index, exp_avg in expected["exp_avg"].items():
        torch.testing.assert_close(restored["moments"][names[index]]["exp_avg"], exp_avg, rtol=0, atol=0)


@pytest.mark.distributed
def test_replicas_start_equal_with_rank_dependent_seeds(tmp_path):
    # Seeds 7 and 8 give different models ...
    inits = []
    for seed in (7, 8):
        L.seed_everything(seed, verbose=False)
        inits.append(TinyMoELM().state_dict())
    assert not torch.equal(inits[0]["moes.0.experts.w1"], inits[1]["moes.0.experts.w1"])
    # ... but under data_parallel="ddp" (every parameter replicated, experts over both ranks) the
    # ranks start from the same replica: rank 0's.
    out = train({"devices": 2, "ep": 1, "mode": "ddp", "epochs": 1, "rank_seeds": True, "out": str(tmp_path)})
    rank0, rank1 = _load(out, "local_rank0.pt"), _load(out, "local_rank1.pt")
    assert_same(rank0, rank1, atol=0)
    torch.testing.assert_close(rank0["moes.0.experts.w1"], inits[0]["moes.0.experts.w1"], rtol=0, atol=0)


@pytest.mark.distributed
def test_a_save_killed_halfway_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = launch({"devices": 1, "ep": 1, "kill_in_save": True, "out": str(tmp_path)})
    assert proc.returncode == -9  # killed inside the save that replaces last.ckpt
    assert read_full_checkpoint(tmp_path / "ckpts" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt")["epoch"] == 1
    last = tmp_path / "ckpts" / "last.ckpt"
    checkpoint = read_full_checkpoint(last)  # the previous version, whole
    epoch0 = read_full_checkpoint(tmp_path / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt")
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == STEPS_PER_EPOCH
    assert_same(checkpoint["state_dict"], epoch0["state_dict"], atol=0)
    # and training resumes from it
    resumed = train({"devices": 1, "ep": 1, "resume": str(last), "out": str(tmp_path / "resumed")})
    assert _load(resumed, "losses.pt").numel() == NUM_SEQ // GLOBAL_BATCH


@pytest.mark.distributed
def test_missing_shard_file_fails_on_every_rank(runs, tmp_path):
    ckpt = tmp_path / "broken.ckpt"
    shutil.copytree(runs["fsdp_ep2"] / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt", ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    shard.unlink()
    proc = launch({"devices": 2, "ep": 2, "resume": str(ckpt), "out": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert f"are in shard file(s) ['{shard.name}'] that are missing" in proc.stderr


@pytest.mark.distributed
def test_predict_with_uneven_batches_per_rank_finishes(tmp_path):
    out = train({"devices": 2, "ep": 2, "predict": True, "out": str(tmp_path)})
    assert [_load(out, f"predictions_rank{r}.pt") for r in range(2)] == [3, 3]  # 3 + 2 real, one empty


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
