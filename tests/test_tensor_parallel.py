"""Tensor parallelism composed with expert parallelism and FSDP2 (the paper's E+D+M), on 2 and 4 CPU processes.

A GPT MoE (attention everywhere, a dense FFN block and a MoE block) trained with plain Lightning in
one process and with ``ExpertParallelStrategy(tensor_parallel_size=2)``: TP=2 on 2 processes,
TP=2 x EP=2 on 4, and TP=2 with ``data_parallel="ddp"`` and full activation checkpointing, give the
same losses and parameters over 8 AdamW steps (dropless, aux weight 0). Each expert sees every
token once (the kept pairs per expert, summed over every rank, equal one process's). Checkpoints
go TP=2 -> TP=1 -> TP=2 bit for bit. Attention and dense FFN weights take 1/TP of each rank's bytes.

This file is also the worker script (``python tests/test_tensor_parallel.py '<json>'``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dist_utils import shut_down
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_moe.models import GPT, GPTConfig
from lightning_moe.moe import moe_layers
from lightning_moe.strategy import ExpertParallelStrategy, ParallelDims, read_full_checkpoint
from lightning_moe.strategy.parallelize import validate_tensor_parallel

VOCAB, SEQ, NUM_SEQ, GLOBAL_BATCH = 48, 8, 64, 8
STEPS_PER_EPOCH = NUM_SEQ // GLOBAL_BATCH


def config(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_layers=2, moe_every=2, num_experts=4, top_k=2,
                expert_ffn_size=24, capacity_factor=None, aux_loss_weight=0.0, max_positions=16, moe_backend="torch",
                dropout=0.0, positions="learned")  # fmt: skip
    return GPTConfig(**{**base, **overrides})


class GPTModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(config())
        with torch.no_grad():
            for _, layer in moe_layers(self.model):
                layer.router.weight.normal_(std=0.5)  # spread the routing over every expert
        self.step_losses: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        self.step_losses.append(loss.detach())
        self.kept.append(torch.stack([layer.last_stats.kept_per_expert for _, layer in moe_layers(self.model)]))
        return loss

    def train_dataloader(self):
        # A data-parallel rank d of N takes sequences d, d + N, ...; its TP ranks read the same ones.
        kwargs = self.trainer.strategy.distributed_sampler_kwargs if self.trainer.world_size > 1 else {}
        replicas, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        data = Subset(dataset(), list(range(rank, NUM_SEQ, replicas)))
        return DataLoader(data, batch_size=GLOBAL_BATCH // replicas, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(99)
    return TensorDataset(torch.randint(VOCAB, (NUM_SEQ, SEQ + 1), generator=g))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class _Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        weights = {n: _full(p) for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        moments = {
            n: {k: _full(v) for k, v in opt.state.get(p, {}).items() if k in ("exp_avg", "exp_avg_sq")}
            for n, p in pl_module.named_parameters()
        }
        local = {n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in pl_module.named_parameters()}
        torch.save(local, self.out / f"local_numel_rank{trainer.global_rank}.pt")
        if trainer.is_global_zero:
            torch.save({"weights": weights, "moments": moments}, self.out / "restored.pt")

    def on_train_end(self, trainer, pl_module):
        losses = trainer.strategy.reduce(torch.stack(pl_module.step_losses), reduce_op="mean")
        kept = trainer.strategy.reduce(torch.stack(pl_module.kept), reduce_op="sum")
        final = {n: _full(p) for n, p in pl_module.named_parameters()}
        if trainer.is_global_zero:
            torch.save({"losses": losses, "kept": kept, "final": final}, self.out / "result.pt")


def run_worker(cfg: dict) -> None:
    torch.set_num_threads(1)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("encdec"):
        _encoder_decoder_check(out)
        return
    L.seed_everything(0, verbose=False)
    module = GPTModule()
    strategy: str | ExpertParallelStrategy = "auto"
    if cfg["tp"] is not None:
        strategy = ExpertParallelStrategy(
            expert_parallel_size=cfg.get("ep", 1),
            tensor_parallel_size=cfg["tp"],
            data_parallel=cfg.get("mode", "fsdp"),
            activation_checkpointing=cfg.get("ac"),
        )
    trainer = L.Trainer(
        accelerator="cpu", devices=cfg["devices"], strategy=strategy, max_epochs=cfg.get("epochs", 1),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpts", save_top_k=-1), _Recorder(out)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=True, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, ckpt_path=cfg.get("resume"))
    shut_down()


def _encoder_decoder_check(out: Path) -> None:
    """TP=2 on 2 processes: the encoder-decoder's logits and gradients equal the unparallelized model's."""
    import torch.distributed as dist

    from lightning_moe.models import EncoderDecoderTransformer, TransformerConfig
    from lightning_moe.strategy.parallelize import ParallelizeConfig, parallelize

    dist.init_process_group("gloo")
    cfg = TransformerConfig(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                            num_experts=4, capacity_factor=None, moe_backend="torch", dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    reference = EncoderDecoderTransformer(cfg)
    model = EncoderDecoderTransformer(cfg)
    model.load_state_dict(reference.state_dict())
    dims = ParallelDims(2, 1, 2)
    parallelize(model, ParallelizeConfig(dims=dims, mesh=dims.build_mesh("cpu")))
    src, tgt = torch.randint(1, 40, (3, 7)), torch.randint(1, 40, (3, 5))
    src[0, -2:] = 0
    outs = []
    for m in (reference, model):
        logits = m(src, tgt, src == 0, tgt == 0)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: _full(p.grad) for n, p in m.named_parameters()}))
    if dist.get_rank() == 0:
        torch.save(outs, out / "encdec.pt")
    dist.destroy_process_group()


def launch(cfg: dict, timeout: float = 300, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    prefix = [sys.executable]
    if torchrun:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg['devices']}"]
    return subprocess.run(
        [*prefix, os.path.abspath(__file__), json.dumps(cfg)], env=env, capture_output=True, text=True,
        timeout=timeout, cwd=cfg["out"],
    )  # fmt: skip


def train(cfg: dict, **kwargs) -> Path:
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    proc = launch(cfg, **kwargs)
    assert proc.returncode == 0, f"worker failed ({cfg}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return Path(cfg["out"])


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    cfgs = {
        "ref": {"devices": 1, "tp": None},
        "tp2": {"devices": 2, "tp": 2},
        "tp2_ep2": {"devices": 4, "tp": 2, "ep": 2},
        "tp2_ddp_full": {"devices": 2, "tp": 2, "mode": "ddp", "ac": "full"},
    }
    return {name: train({**cfg, "out": str(root / name)}) for name, cfg in cfgs.items()}


def _result(run: Path) -> dict:
    return torch.load(run / "result.pt", weights_only=True)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp2", "tp2_ep2", "tp2_ddp_full"])
def test_tensor_parallel_runs_match_one_process(runs, name):
    ref, got = _result(runs["ref"]), _result(runs[name])
    assert ref["losses"].numel() == STEPS_PER_EPOCH  # 8 AdamW steps
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    assert_same(got["final"], ref["final"])
    # Each expert sees every (token, choice) once: the kept pairs per expert, summed over all ranks,
    # are one process's (with the tokens dispatched once per TP rank they would be 2x).
    assert torch.equal(got["kept"], ref["kept"])
    assert ref["kept"].sum() == STEPS_PER_EPOCH * GLOBAL_BATCH * SEQ * 2  # every token, top-2, dropless


@pytest.mark.distributed
def test_attention_and_dense_ffn_bytes_are_split_over_tp(runs):
    full = _result(runs["ref"])["final"]
    local = [torch.load(runs["tp2"] / f"local_numel_rank{r}.pt", weights_only=True) for r in range(2)]
    split = [n for n in full if (".attn." in n and n.endswith("weight")) or ".ffn.w" in n]
    assert split
    for name in split:
        assert local[0][name] == local[1][name] == full[name].numel() // 2, name


@pytest.mark.distributed
def test_checkpoint_goes_tp2_to_tp1_and_back_bit_for_bit(runs, tmp_path):
    ckpt_a = runs["tp2"] / "ckpts" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    one = train(
        {"devices": 1, "tp": 1, "mode": "ddp", "resume": str(ckpt_a), "epochs": 2, "out": str(tmp_path / "one")}
    )
    expected = read_full_checkpoint(ckpt_a)["state_dict"]
    assert_same(torch.load(one / "restored.pt", weights_only=True)["weights"], expected, atol=0)
    ckpt_b = one / "ckpts" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
    back = train({"devices": 2, "tp": 2, "resume": str(ckpt_b), "epochs": 3, "out": str(tmp_path / "back")})
    full_b = read_full_checkpoint(ckpt_b)
    restored = torch.load(back / "restored.pt", weights_only=True)
    assert_same(restored["weights"], full_b["state_dict"], atol=0)
    names = [n for n, _ in GPTModule().named_parameters()]
    for index, state in full_b["optimizer_states"][0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(restored["moments"][names[index]][key], state[key], rtol=0, atol=0)


@pytest.mark.distributed
def test_encoder_decoder_under_tensor_parallelism(tmp_path):
    train({"devices": 2, "encdec": True, "out": str(tmp_path)}, torchrun=True)
    (ref_logits, ref_grads), (logits, grads) = torch.load(tmp_path / "encdec.pt", weights_only=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert_same(grads, ref_grads, atol=1e-6)


def test_layouts_that_do_not_divide_are_named_before_any_collective():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_parallel_size=4"):
        ParallelDims(world_size=6, tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"the 2 data-parallel ranks .* not divisible by expert_parallel_size=4"):
        ParallelDims(world_size=4, expert_parallel_size=4, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn has n_heads=6, not divisible by tensor_parallel_size=4"):
        validate_tensor_parallel(GPT(config(d_model=48, n_heads=6)), 4)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn has d_ff=66, not divisible by tensor_parallel_size=4"):
        validate_tensor_parallel(GPT(config(d_ff=66)), 4)
    strategy = ExpertParallelStrategy(tensor_parallel_size=4)
    with pytest.raises(ValueError, match="n_heads=6, not divisible"):
        strategy.resolve_dims(GPT(config(d_model=48, n_heads=6)), world_size=8, ranks_per_node=8)
    assert strategy.resolve_dims(GPT(config()), world_size=8, ranks_per_node=8).expert_parallel_size == 2


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
