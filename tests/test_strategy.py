"""ExpertParallelStrategy in one process: mesh, validation, registry, YAML, clipping, checkpoint format."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_moe
import lightning_moe.strategy  # registers the strategy names
from lightning_moe.moe import MoE, moe_layers
from lightning_moe.moe.dispatch import ExpertParallelGroup
from lightning_moe.strategy import (
    CheckpointError,
    ExpertParallelMesh,
    ExpertParallelStrategy,
    clip_grad_norm_,
    consolidate_checkpoint,
    default_expert_parallel_size,
    expert_parameters,
    load_checkpoint,
)
from lightning_moe.strategy.checkpoint import (
    expert_layer_specs,
    optimizer_expert_params,
    shard_file_name,
    write_sharded_checkpoint,
)

# ------------------------------------------------------------------------------------------------
# mesh and validation


def test_mesh_layout_is_designs_e_plus_d():
    mesh = ExpertParallelMesh(world_size=8, expert_parallel_size=4)
    assert mesh.shape == (2, 4)
    assert mesh.expert_parallel_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mesh.expert_data_parallel_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.coordinates(6) == (1, 2)


def test_mesh_errors_name_the_values_and_the_fix():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by expert_parallel_size=4; .* \[1, 2, 3, 6\]"):
        ExpertParallelMesh(world_size=6, expert_parallel_size=4)
    with pytest.raises(ValueError, match="expert_parallel_size=0 must be a positive integer"):
        ExpertParallelMesh(world_size=2, expert_parallel_size=0)
    mesh = ExpertParallelMesh(world_size=4, expert_parallel_size=4)
    with pytest.raises(ValueError, match=r"MoE layer 'blocks\.3\.ffn' has num_experts=6, which is not divisible by"):
        mesh.validate_num_experts([("blocks.1.ffn", 8), ("blocks.3.ffn", 6)])


@pytest.mark.parametrize(
    ("world", "per_node", "experts", "expected"),
    [(2, 2, [8, 8], 2), (16, 8, [64], 8), (8, 8, [4, 8], 4), (4, 4, [6], 2), (3, 3, [8], 1), (8, 8, [], 1)],
)
def test_default_expert_parallel_size(world, per_node, experts, expected):
    assert default_expert_parallel_size(world, per_node, experts) == expected


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_constructor_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        ExpertParallelStrategy(expert_parallel_size=bad)


def test_resolve_mesh_validates_the_model():
    model = nn.Sequential(MoE(8, 8, num_experts=6, top_k=2))
    strategy = ExpertParallelStrategy(expert_parallel_size=4)
    with pytest.raises(ValueError, match="world size 2 is not divisible by expert_parallel_size=4"):
        strategy.resolve_mesh(model, world_size=2, ranks_per_node=2)
    with pytest.raises(ValueError, match="MoE layer '0' has num_experts=6, which is not divisible"):
        strategy.resolve_mesh(model, world_size=4, ranks_per_node=4)
    assert ExpertParallelStrategy().resolve_mesh(model, world_size=4, ranks_per_node=4).expert_parallel_size == 2


# ------------------------------------------------------------------------------------------------
# registry and YAML


class _Tiny(L.LightningModule):
    def __init__(self, num_experts: int = 4) -> None:
        super().__init__()
        self.moe = MoE(8, 8, num_experts=num_experts, top_k=2)


def test_registered_names():
    assert "expert_parallel" in StrategyRegistry
    assert "expert_parallel_spawn" in StrategyRegistry
    trainer = L.Trainer(strategy="expert_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy)
    assert trainer.strategy._start_method == "popen"
    trainer = L.Trainer(strategy="expert_parallel_spawn", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy._start_method == "spawn"


@pytest.mark.parametrize(
    "class_path", ["lightning_moe.strategy.ExpertParallelStrategy", "lightning_moe.ExpertParallelStrategy"]
)
def test_yaml_class_path(tmp_path, monkeypatch, class_path):
    if class_path == "lightning_moe.ExpertParallelStrategy" and not hasattr(lightning_moe, "ExpertParallelStrategy"):
        pytest.skip("lightning_moe does not export ExpertParallelStrategy yet")
    monkeypatch.setattr("sys.argv", ["lightning-moe"])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  devices: 2\n"
        "  logger: false\n"
        "  strategy:\n"
        f"    class_path: {class_path}\n"
        "    init_args:\n"
        "      expert_parallel_size: 2\n"
        "      process_group_backend: gloo\n"
    )
    cli = LightningCLI(_Tiny, run=False, args=["--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ExpertParallelStrategy)
    assert strategy.expert_parallel_size == 2
    assert strategy.process_group_backend == "gloo"


# ------------------------------------------------------------------------------------------------
# clipping


def test_clip_grad_norm_matches_torch_without_expert_parallelism():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.clone()
    for norm_type in (2.0, 1.0, math.inf):
        expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type)
        total = clip_grad_norm_(params, 0.5, {id(params[1]), id(params[3])}, None, norm_type=norm_type)
        torch.testing.assert_close(total, expected)
        for r, p in zip(ref, params, strict=True):
            torch.testing.assert_close(p.grad, r.grad)


def test_expert_parameters_are_the_routed_experts_only():
    model = nn.ModuleDict({"a": MoE(8, 8, num_experts=4, num_shared_experts=1), "b": MoE(8, 8, 4, activation="gelu")})
    names = [n for n, _ in expert_parameters(model)]
    assert names == ["a.experts.w1", "a.experts.w2", "a.experts.w3", "b.experts.w1", "b.experts.w2"]


# ------------------------------------------------------------------------------------------------
# checkpoint format (ranks simulated in one process)


def _model(num_experts: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"enc": MoE(6, 5, num_experts=num_experts, top_k=2), "dec": MoE(6, 7, num_experts, top_k=2, activation="relu")}
    )


def _trained_state(model: nn.Module) -> tuple[dict, torch.optim.Optimizer]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 3}, opt


def _write_sharded(path, world: int = 2) -> tuple[nn.Module, dict]:
    """Write a checkpoint as ``world`` EP ranks would; return the unsharded model and its checkpoint."""
    full = _model()
    torch.manual_seed(1)
    full_ckpt, _ = _trained_state(full)
    for rank in range(world):
        model = _model()
        model.load_state_dict(full_ckpt["state_dict"])
        for _, layer in moe_layers(model):
            layer.shard_experts(ExpertParallelGroup(group=None, size=world, rank=rank))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        maps = [optimizer_expert_params(opt, model)]
        ckpt = {
            "state_dict": model.state_dict(),
            "optimizer_states": [_slice_opt(full_ckpt, maps[0], rank, world)],
            "epoch": 3,
        }
        write_sharded_checkpoint(
            ckpt, path, expert_layer_specs(model), maps, write_common=rank == 0, shard=(rank, world)
        )
    return full, full_ckpt


def _slice_opt(full_ckpt: dict, experts: dict, rank: int, world: int) -> dict:
    """The full model's optimizer state with expert moments cut to this rank's rows."""
    opt_state = full_ckpt["optimizer_states"][0]
    state = {}
    for idx, entry in opt_state["state"].items():
        entry = dict(entry)
        if idx in experts:
            for name in ("exp_avg", "exp_avg_sq"):
                L = entry[name].shape[0] // world
                entry[name] = entry[name][rank * L : (rank + 1) * L].clone()
        state[idx] = entry
    return {"state": state, "param_groups": opt_state["param_groups"]}


def test_sharded_checkpoint_round_trips_at_any_size(tmp_path):
    path = tmp_path / "ckpt"
    full, ref = _write_sharded(path)
    assert sorted(p.name for p in path.iterdir()) == ["common.pt", shard_file_name(0, 2), shard_file_name(1, 2)]
    # EP=1: everything back, stacked.
    loaded = load_checkpoint(path, expert_layer_specs(_model()))
    assert loaded["epoch"] == 3
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(loaded["state_dict"][key], value, rtol=0, atol=0)
    for idx, entry in ref["optimizer_states"][0]["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(loaded["optimizer_states"][0]["state"][idx][name], value, rtol=0, atol=0)
    # EP=4, rank 3: its single expert of each layer.
    model = _model()
    for _, layer in moe_layers(model):
        layer.shard_experts(ExpertParallelGroup(group=None, size=4, rank=3))
    loaded = load_checkpoint(path, expert_layer_specs(model))
    torch.testing.assert_close(loaded["state_dict"]["enc.experts.w1"], ref["state_dict"]["enc.experts.w1"][3:4])
    model.load_state_dict(loaded["state_dict"])
    # Consolidated: an ordinary checkpoint of the unsharded model.
    consolidated = consolidate_checkpoint(path, tmp_path / "model.ckpt")
    assert consolidated["expert_parallel"]["layers"]["enc"]["num_experts"] == 4
    plain = torch.load(tmp_path / "model.ckpt", weights_only=False)
    fresh = _model()
    fresh.load_state_dict(plain["state_dict"])
    torch.testing.assert_close(fresh["dec"].experts.w2, full["dec"].experts.w2)
    # ... which also loads re-sliced.
    loaded = load_checkpoint(tmp_path / "model.ckpt", expert_layer_specs(model))
    torch.testing.assert_close(loaded["state_dict"]["dec.experts.w2"], ref["state_dict"]["dec.experts.w2"][3:4])


def _rewrite_shard(path, index: int, edit) -> None:
    file = path / shard_file_name(index, 2)
    shard = torch.load(file, weights_only=True)
    edit(shard)
    torch.save(shard, file)


def test_missing_expert_is_named(tmp_path):
    path = tmp_path / "ckpt"
    _write_sharded(path)
    _rewrite_shard(path, 1, lambda s: s["experts"]["dec.experts.w1"].pop(3))
    with pytest.raises(CheckpointError, match=r"expert 3 of MoE layer 'dec' \(dec.experts.w1\) is missing"):
        load_checkpoint(path, expert_layer_specs(_model()))


def test_duplicated_expert_is_named(tmp_path):
    path = tmp_path / "ckpt"
    _write_sharded(path)
    dup = torch.load(path / shard_file_name(0, 2), weights_only=True)["experts"]["enc.experts.w3"][1]
    _rewrite_shard(path, 1, lambda s: s["experts"]["enc.experts.w3"].__setitem__(1, dup))
    with pytest.raises(CheckpointError, match=r"expert 1 of MoE layer 'enc' \(enc.experts.w3\) is stored twice"):
        load_checkpoint(path, expert_layer_specs(_model()))


def test_missing_shard_file_is_named(tmp_path):
    path = tmp_path / "ckpt"
    _write_sharded(path)
    (path / shard_file_name(0, 2)).unlink()
    with pytest.raises(CheckpointError, match=r"expert shard experts-00000-of-00002\.pt listed in .* is missing"):
        load_checkpoint(path, expert_layer_specs(_model()))


def test_expert_count_mismatch_is_named(tmp_path):
    path = tmp_path / "ckpt"
    _write_sharded(path)
    with pytest.raises(CheckpointError, match=r"MoE layer 'enc' has num_experts=8 but checkpoint .* holds 4 experts"):
        load_checkpoint(path, expert_layer_specs(_model(num_experts=8)))
    full = _model()  # the single-file path checks the expert count too
    torch.save({"state_dict": full.state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match=r"MoE layer 'enc' has num_experts=8 .* holds 4 experts for it \(enc"):
        load_checkpoint(tmp_path / "plain.ckpt", expert_layer_specs(_model(num_experts=8)))


def test_consolidate_command_keeps_module_state_and_drops_training_state(tmp_path, capsys):
    from lightning_moe.strategy.consolidate import main

    path = tmp_path / "ckpt"
    full, _ = _write_sharded(path)
    main([str(path), str(tmp_path / "model.ckpt"), "--weights-only"])
    assert "2 MoE layers, experts [4, 4]" in capsys.readouterr().out
    plain = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert "optimizer_states" not in plain
    assert plain["epoch"] == 3  # anything the module or Lightning put there besides training state stays
    fresh = _model()
    fresh.load_state_dict(plain["state_dict"])
    torch.testing.assert_close(fresh["enc"].experts.w3, full["enc"].experts.w3)
