"""ExpertParallelStrategy pieces in one process: layout, validation, registry, YAML, init, checkpointing, clipping."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_moe
from lightning_moe.models import GPT, DecoderConfig, EncoderDecoderTransformer, GPTConfig, MoEDecoder, TransformerConfig
from lightning_moe.moe import MoE, moe_layers
from lightning_moe.strategy import (
    CheckpointError,
    ExpertParallelStrategy,
    ParallelDims,
    clip_grad_norm_,
    consolidate_checkpoint,
    default_expert_parallel_size,
    expert_parameters,
    read_full_checkpoint,
)
from lightning_moe.strategy.expert_parallel import _empty_like
from lightning_moe.strategy.parallelize import _checkpoint_block, find_root, materialize, transformer_blocks

# ------------------------------------------------------------------------------------------------
# layout and validation


def test_layout_is_designs_e_plus_d():
    dims = ParallelDims(world_size=8, expert_parallel_size=4)
    assert (dims.data_parallel_size, dims.expert_data_parallel_size) == (8, 2)
    assert dims.mesh_dim_names == ("edp", "ep", "tp") and dims.mesh_shape == (2, 4, 1)
    assert dims.expert_parallel_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.expert_data_parallel_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.coordinates(6) == {"edp": 1, "ep": 2, "tp": 0}
    ddp = ParallelDims(world_size=4, expert_parallel_size=2, data_parallel="ddp")
    assert ddp.mesh_dim_names == ("edp", "ep", "shard", "tp") and ddp.mesh_shape == (2, 2, 1, 1)


def test_layout_errors_name_the_values_and_the_fix():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by expert_parallel_size=4; .* \[1, 2, 3, 6\]"):
        ParallelDims(world_size=6, expert_parallel_size=4)
    with pytest.raises(ValueError, match="expert_parallel_size=0 must be a positive integer"):
        ParallelDims(world_size=2, expert_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel='zero2' is not supported"):
        ParallelDims(world_size=2, data_parallel="zero2")
    dims = ParallelDims(world_size=4, expert_parallel_size=4)
    with pytest.raises(ValueError, match=r"MoE layer 'blocks\.3\.ffn' has num_experts=6, which is not divisible by"):
        dims.validate_num_experts([("blocks.1.ffn", 8), ("blocks.3.ffn", 6)])


@pytest.mark.parametrize(
    ("world", "per_node", "experts", "expected"),
    [(2, 2, [8, 8], 2), (16, 8, [64], 8), (8, 8, [4, 8], 4), (4, 4, [6], 2), (3, 3, [8], 1), (8, 8, [], 1)],
)
def test_default_expert_parallel_size(world, per_node, experts, expected):
    assert default_expert_parallel_size(world, per_node, experts) == expected


def test_fsdp_shard_dim_pads_only_dim_0():
    from lightning_moe.strategy.mesh import fsdp_shard_dim

    assert fsdp_shard_dim((10, 3), 4) == 0  # enough rows: dim 0, padded
    assert fsdp_shard_dim((2, 8, 12), 4) == 2  # too few rows: the largest dim that divides evenly
    assert fsdp_shard_dim((1, 16, 20), 8) == 1  # 20 does not divide by 8, 16 does
    assert fsdp_shard_dim((1, 6, 10), 4) == 0  # none does: dim 0, padded (FSDP2 pads dim 0 only)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(expert_parallel_size=0), "must be a positive integer"),
        (dict(expert_parallel_size=1.5), "must be a positive integer"),
        (dict(expert_parallel_size=True), "must be a positive integer"),
        (dict(data_parallel="zero"), "data_parallel='zero' is not supported"),
        (dict(activation_checkpointing="selective"), "activation_checkpointing='selective' is not supported"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size=0 must be a positive integer"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertParallelStrategy(**kwargs)


def test_resolve_dims_validates_the_model():
    model = nn.Sequential(MoE(8, 8, num_experts=6, top_k=2))
    strategy = ExpertParallelStrategy(expert_parallel_size=4)
    with pytest.raises(ValueError, match="world size 2 is not divisible by expert_parallel_size=4"):
        strategy.resolve_dims(model, world_size=2, ranks_per_node=2)
    with pytest.raises(ValueError, match="MoE layer '0' has num_experts=6, which is not divisible"):
        strategy.resolve_dims(model, world_size=4, ranks_per_node=4)
    assert ExpertParallelStrategy().resolve_dims(model, world_size=4, ranks_per_node=4).expert_parallel_size == 2


# ------------------------------------------------------------------------------------------------
# registry, YAML, precision


class _Tiny(L.LightningModule):
    def __init__(self, num_experts: int = 4) -> None:
        super().__init__()
        self.moe = MoE(8, 8, num_experts=num_experts, top_k=2)


def test_registered_name():
    assert "expert_parallel" in StrategyRegistry
    trainer = L.Trainer(strategy="expert_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy)
    assert trainer.strategy.data_parallel == "fsdp"


@pytest.mark.parametrize(
    "class_path", ["lightning_moe.strategy.ExpertParallelStrategy", "lightning_moe.ExpertParallelStrategy"]
)
def test_yaml_class_path(tmp_path, monkeypatch, class_path):
    assert hasattr(lightning_moe, "ExpertParallelStrategy")
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
        "      data_parallel: ddp\n"
        "      activation_checkpointing: experts\n"
        "      cpu_offload: true\n"
        "      process_group_backend: gloo\n"
    )
    cli = LightningCLI(_Tiny, run=False, args=["--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ExpertParallelStrategy)
    assert strategy.expert_parallel_size == 2
    assert (strategy.data_parallel, strategy.activation_checkpointing, strategy.cpu_offload) == ("ddp", "experts", True)
    assert strategy.process_group_backend == "gloo"


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_is_refused_before_training(precision):
    with pytest.raises(ValueError, match=r"bf16-mixed"):
        L.Trainer(strategy=ExpertParallelStrategy(), precision=precision, accelerator="cpu", devices=1, logger=False)


@pytest.mark.parametrize(("precision", "autocast"), [("32-true", False), ("bf16-mixed", True), ("bf16-true", False)])
def test_supported_precisions_keep_lightnings_behaviour(precision, autocast):
    trainer = L.Trainer(strategy=ExpertParallelStrategy(), precision=precision, accelerator="cpu", devices=1)
    plugin = trainer.strategy.precision_plugin
    assert plugin.precision == precision
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") == autocast


def test_cpu_offload_needs_a_gpu():
    trainer = L.Trainer(strategy=ExpertParallelStrategy(cpu_offload=True), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"cpu_offload=True moves the training state of a GPU .* device is cpu"):
        trainer.strategy.setup_environment()  # the first thing fit does with the strategy


# ------------------------------------------------------------------------------------------------
# parallelize helpers: the root, meta-device materialisation, checkpointing


def _gpt_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, num_experts=4, top_k=2, max_positions=12,
                expert_ffn_size=24, capacity_factor=None, moe_backend="torch")  # fmt: skip
    return GPTConfig(**{**base, **overrides})


def test_find_root_is_the_module_that_runs_the_blocks():
    holder = nn.Module()
    holder.model = GPT(_gpt_config(n_layers=1))
    assert find_root(holder) is holder.model  # one block: its parent, not the block
    single = nn.Module()
    single.moe = MoE(8, 8, num_experts=2)
    assert find_root(single) is single
    seq = EncoderDecoderTransformer(TransformerConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, num_experts=2))
    assert find_root(seq) is seq
    assert len(transformer_blocks(seq)) == seq.config.n_encoder_layers + seq.config.n_decoder_layers


@pytest.mark.parametrize("family", ["gpt", "encoder_decoder", "decoder", "gpt_sinusoidal"])
def test_meta_device_materialisation_equals_the_normal_init(family):
    def build():
        if family.startswith("gpt"):
            return GPT(_gpt_config(positions="sinusoidal" if family == "gpt_sinusoidal" else "learned"))
        if family == "encoder_decoder":
            return EncoderDecoderTransformer(
                TransformerConfig(
                    vocab_size=30,
                    d_model=16,
                    n_heads=2,
                    d_ff=32,
                    num_experts=4,
                    expert_bias=True,
                    bias_update_rate=0.001,
                )
            )
        return MoEDecoder(DecoderConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                                        num_experts=4, top_k=2, num_shared_experts=1))  # fmt: skip

    torch.manual_seed(3)
    expected = build()
    torch.manual_seed(3)
    with torch.device("meta"):
        model = build()
    materialize(model, torch.device("cpu"))
    got = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in (dict(expected.named_parameters()) | dict(expected.named_buffers())).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_materialisation_refuses_modules_it_cannot_initialise():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), Opaque())
    with pytest.raises(ValueError, match=r"Opaque hold.* no reset_parameters"):
        materialize(model, torch.device("cpu"))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_keep_the_aux_loss_gradient(use_reentrant):
    torch.manual_seed(0)
    config = _gpt_config(aux_loss_weight=0.1, z_loss_weight=0.01, capacity_factor=1.0, dropout=0.0)
    model = GPT(config)
    ids = torch.randint(config.vocab_size, (3, 10))
    grads = []
    for mode in (None, "full", "experts"):
        m = GPT(config)
        m.load_state_dict(model.state_dict())
        if mode == "full":
            for block in transformer_blocks(m):
                _checkpoint_block(block, use_reentrant=use_reentrant)
        elif mode == "experts":
            for _, layer in moe_layers(m):
                layer.recompute_experts = True
        torch.manual_seed(1)  # the same RTS draws
        loss = F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()) + m.moe_aux_loss()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        router = moe_layers(m)[0][1].router.weight.grad
        assert router is not None and router.abs().sum() > 0
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # ... and under torch.compile of the (checkpointed) blocks (aot_eager: dynamo and AOTAutograd, no codegen).
    for mode in ("full", "experts"):
        m = GPT(config)
        m.load_state_dict(model.state_dict())
        if mode == "full":
            for block in transformer_blocks(m):
                _checkpoint_block(block, use_reentrant=use_reentrant)
        else:
            for _, layer in moe_layers(m):
                layer.recompute_experts = True
        for block in transformer_blocks(m):
            block.compile(backend="aot_eager")
        torch.manual_seed(1)
        (F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()) + m.moe_aux_loss()).backward()
        for name, param in m.named_parameters():
            name = name.replace("_orig_mod.", "")
            torch.testing.assert_close(
                param.grad, grads[0][name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
            )
    # The aux loss alone reaches the router through the checkpointed blocks.
    m = GPT(config)
    for block in transformer_blocks(m):
        _checkpoint_block(block, use_reentrant=use_reentrant)
    m(ids)
    m.moe_aux_loss().backward()
    assert moe_layers(m)[0][1].router.weight.grad.abs().sum() > 0


def test_empty_batches_keep_their_structure():
    batch = {"ids": torch.ones(3, 4), "text": ["a", "b", "c"], "pair": (torch.zeros(3), torch.zeros(3, 2))}
    empty = _empty_like(batch)
    assert empty["ids"].shape == (0, 4) and empty["text"] == [] and empty["pair"][1].shape == (0, 2)


# ------------------------------------------------------------------------------------------------
# clipping and expert parameters


def test_clip_grad_norm_matches_torch_in_one_process():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.clone()
    for norm_type in (2.0, 1.0, math.inf):
        expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type)
        total = clip_grad_norm_(params, 0.5, norm_type=norm_type)
        torch.testing.assert_close(total, expected)
        for r, p in zip(ref, params, strict=True):
            torch.testing.assert_close(p.grad, r.grad)


def test_expert_parameters_are_the_routed_experts_only():
    model = nn.ModuleDict({"a": MoE(8, 8, num_experts=4, num_shared_experts=1), "b": MoE(8, 8, 4, activation="gelu")})
    names = [n for n, _ in expert_parameters(model)]
    assert names == ["a.experts.w1", "a.experts.w2", "a.experts.w3", "b.experts.w1", "b.experts.w2"]


# ------------------------------------------------------------------------------------------------
# checkpoints readable without a process group


def test_consolidate_command_reads_the_legacy_format(tmp_path, capsys):
    from pathlib import Path

    from lightning_moe.cli import main

    data = Path(__file__).parent / "data"
    expected = torch.load(data / "legacy_ep2_step4_expected.pt", weights_only=True)
    with pytest.raises(SystemExit) as exc:
        main(["consolidate", str(data / "legacy_ep2_step4.ckpt"), str(tmp_path / "model.ckpt"), "--weights-only"])
    assert exc.value.code == 0
    assert "2 MoE layers, experts [4, 4]" in capsys.readouterr().out
    plain = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert "optimizer_states" not in plain and plain["epoch"] == 0
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(plain["state_dict"][key], value, rtol=0, atol=0)
    full = consolidate_checkpoint(data / "legacy_ep2_step4.ckpt", tmp_path / "full.ckpt")
    assert len(full["optimizer_states"][0]["state"]) == len(expected["state_dict"])


def test_plain_files_read_as_they_are(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "x.ckpt")
    assert read_full_checkpoint(tmp_path / "x.ckpt")["epoch"] == 1
    with pytest.raises(CheckpointError, match="not a readable distributed checkpoint"):
        (tmp_path / "bad.ckpt").mkdir()
        (tmp_path / "bad.ckpt" / ".metadata").write_bytes(b"garbage")
        (tmp_path / "bad.ckpt" / "meta.pt").write_bytes(b"")
        from lightning_moe.strategy.checkpoint import check_experts

        check_experts(tmp_path / "bad.ckpt", {})
