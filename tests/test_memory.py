"""The memory estimator: parameter inventory, saved activations, sharding arithmetic, the CLI.

Saved activations are checked against ``torch.autograd.graph.saved_tensors_hooks`` (through
``SavedTensorBytes``): the bytes of every distinct storage a real forward (model + loss) saves for
its backward. The ledger enumerates those tensors, so the two agree to the byte; the one known
CPU/CUDA difference (a bfloat16 LayerNorm keeps its mean and rstd in bfloat16 on CPU, in float32
on CUDA, where the ledger is written for) is computed exactly in the test, not absorbed by a
tolerance. ``bf16-mixed`` is not checked on CPU: CPU autocast has other op lists than CUDA's
(LayerNorm is not run in float32), so benchmarks/memory_check.py measures it on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_moe.cli import main as cli_main
from lightning_moe.models import GPT, EncoderDecoderTransformer, GPTConfig, TransformerConfig
from lightning_moe.modules.losses import label_smoothed_nll
from lightning_moe.moe.layer import moe_layers
from lightning_moe.strategy.activation_memory import SavedTensorBytes, estimate_activations
from lightning_moe.strategy.memory import estimate_memory, parameter_tensors, shard_numel
from lightning_moe.strategy.memory_command import MODULE_CONFIGS, model_config_from_recipe

ROOT = Path(__file__).resolve().parents[1]
B, T = 3, 10


def gpt_config(**overrides) -> GPTConfig:
    fields = dict(
        vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=3, num_experts=4, top_k=2, moe_every=2,
        dropout=0.0, capacity_factor=None, moe_backend="torch", activation="swiglu",
    )  # fmt: skip
    fields.update(overrides)
    return GPTConfig(**fields)


def t5_config(**overrides) -> TransformerConfig:
    fields = dict(
        vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, num_experts=4,
        top_k=2, dropout=0.0, capacity_factor=None, moe_backend="torch", activation="gelu",
    )  # fmt: skip
    fields.update(overrides)
    return TransformerConfig(**fields)


# --------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize(
    "overrides",
    [
        dict(activation="swiglu", moe_every=1),
        dict(activation="gelu", moe_every=2, num_shared_experts=1, positions="sinusoidal", expert_ffn_size=24),
        dict(activation="relu", moe_every=0),
        dict(activation="swiglu", moe_every=3, num_shared_experts=2, expert_ffn_size=40, top_k=1),
        dict(moe_layers=[0, 2], num_experts=6),
    ],
)
def test_parameter_tensors_are_the_gpt_parameters(overrides):
    config = gpt_config(**overrides)
    model = GPT(config)
    assert [(p.name, p.shape) for p in parameter_tensors(config)] == [
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    ]
    estimate = estimate_memory(config, batch_size=1, seq_len=8, world_size=1)
    assert estimate.parameters_count == sum(p.numel() for p in model.parameters())


def test_parameter_tensors_are_the_encoder_decoder_parameters():
    for config in (t5_config(), t5_config(activation="swiglu", num_shared_experts=1, positions="learned")):
        model = EncoderDecoderTransformer(config)
        assert [(p.name, p.shape) for p in parameter_tensors(config)] == [
            (n, tuple(p.shape)) for n, p in model.named_parameters()
        ]


def test_parameter_kinds_and_units():
    config = gpt_config(moe_every=2, num_shared_experts=1)
    by_name = {p.name: p for p in parameter_tensors(config)}
    assert by_name["blocks.1.ffn.experts.w1"].kind == "expert"
    assert by_name["blocks.1.ffn.experts.w1"].unit == "blocks.1.ffn.experts"
    assert by_name["blocks.1.ffn.router.weight"].unit == "blocks.1"
    assert by_name["blocks.1.ffn.shared_experts.w1"].kind == "dense"  # non-expert in the placement table
    assert by_name["blocks.1.ffn.shared_experts.w1"].unit == "blocks.1"
    assert by_name["embed.weight"].unit == by_name["norm.bias"].unit == "root"


# --------------------------------------------------------------------------------------------
# saved activations against autograd's saved tensors


def _to_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    return model.to(torch.bfloat16) if precision == "bf16-true" else model


def _cpu_norm_stats_difference(n_norms_tokens: int, precision: str) -> int:
    """CPU keeps a bfloat16 LayerNorm's mean and rstd in bfloat16 (2 bytes each), CUDA in float32 (4)."""
    return 2 * 2 * n_norms_tokens if precision == "bf16-true" else 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(activation="gelu"),
        dict(activation="relu"),
        dict(num_shared_experts=2),
        dict(moe_every=1, top_k=1),
        dict(moe_every=0),
        dict(positions="sinusoidal", top_k=3, expert_ffn_size=24),
    ],
)
def test_gpt_saved_activations_match_autograd(overrides, precision):
    torch.manual_seed(0)
    config = gpt_config(**overrides)
    model = _to_precision(GPT(config), precision)
    ids, labels = torch.randint(config.vocab_size, (B, T)), torch.randint(config.vocab_size, (B, T))
    with SavedTensorBytes([model]) as saved:
        logits = model(ids)  # the loss of LanguageModelModule._token_nll
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    estimate = estimate_activations(config, batch_size=B, seq_len=T, precision=precision, moe_backend="torch")
    norms = 2 * config.n_layers + 1
    assert estimate.saved - saved.nbytes == _cpu_norm_stats_difference(norms * B * T, precision)
    assert estimate.saved == sum(n for _, n in estimate.parts)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(activation="swiglu", num_shared_experts=1, positions="learned"), dict(moe_every=1, top_k=1)],
)
def test_encoder_decoder_saved_activations_match_autograd(overrides, precision):
    torch.manual_seed(0)
    config = t5_config(**overrides)
    model = _to_precision(EncoderDecoderTransformer(config), precision)
    S = 7
    src = torch.randint(1, config.vocab_size, (B, S))
    tgt_in, tgt_out = torch.randint(1, config.vocab_size, (B, T)), torch.randint(1, config.vocab_size, (B, T))
    pad = 0
    with SavedTensorBytes([model]) as saved:  # MultitaskTranslationModule's training loss
        logits = model(src, tgt_in, src == pad, tgt_in == pad)
        loss, _, mask = label_smoothed_nll(logits, tgt_out, 0.1, ignore_index=pad)
        loss.sum() / mask.sum().clamp_min(1)
    estimate = estimate_activations(
        config, batch_size=B, seq_len=T, source_len=S, precision=precision, moe_backend="torch"
    )
    norm_tokens = (2 * config.n_encoder_layers + 1) * B * S + (3 * config.n_decoder_layers + 1) * B * T
    assert estimate.saved - saved.nbytes == _cpu_norm_stats_difference(norm_tokens, precision)


_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, torch
    import torch.nn.functional as F
    from lightning_moe.models import GPT, GPTConfig
    from lightning_moe.strategy.activation_memory import SavedTensorBytes, estimate_activations
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=2, num_experts=4, top_k=2,
                       moe_every=2, dropout=0.0, capacity_factor=None, moe_backend="triton", activation="swiglu",
                       expert_ffn_size=32, num_shared_experts=1)
    model = GPT(config)
    ids, labels = torch.randint(61, (2, 8)), torch.randint(61, (2, 8))
    with SavedTensorBytes([model]) as saved:
        F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten(), reduction="sum")
    est = estimate_activations(config, batch_size=2, seq_len=8, precision="32-true", moe_backend="triton")
    print(json.dumps({"measured": saved.nbytes, "estimated": est.saved}))
    """
)


def test_triton_saved_activations_match_autograd_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["measured"] == result["estimated"]


def test_saved_tensor_bytes_leaves_out_parameters_and_counts_storages_once():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorBytes([linear]) as saved:
        h = linear(x)
        (h * h).sum()  # mul saves h twice: one storage
    assert saved.nbytes == x.numel() * 4 + h.numel() * 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_checkpointing_saved_activations_match_autograd(backend):
    pytest.importorskip("lightning_moe.strategy.parallelize")
    if backend == "triton":
        pytest.importorskip("triton")
        env = dict(
            os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        proc = subprocess.run(
            [sys.executable, __file__, "checkpointing", backend], env=env, capture_output=True, text=True,
            timeout=600, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        results = _checkpointing_cases(backend)
    for name, measured, estimated in results:
        assert measured == estimated, name


def _checkpointing_cases(backend: str) -> list[tuple[str, int, int]]:
    """Saved bytes of a GPT forward with the strategy's checkpointing applied, against the estimate."""
    pytest.importorskip("lightning_moe.strategy.parallelize")  # the FSDP2 strategy (issue 11) lands with it
    from lightning_moe.strategy.parallelize import _checkpoint_block, transformer_blocks

    results = []
    for mode in ("full", "experts"):
        for overrides in (dict(), dict(activation="gelu", num_shared_experts=1), dict(moe_every=1, top_k=1)):
            torch.manual_seed(0)
            config = gpt_config(moe_backend=backend, **overrides)
            model = GPT(config)
            if mode == "full":
                for block in transformer_blocks(model):
                    _checkpoint_block(block)
            else:
                for _, layer in moe_layers(model):
                    layer.recompute_experts = True
            ids, labels = torch.randint(config.vocab_size, (B, T)), torch.randint(config.vocab_size, (B, T))
            with SavedTensorBytes([model]) as saved:
                logits = model(ids)
                F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
            estimate = estimate_activations(
                config, batch_size=B, seq_len=T, precision="32-true", moe_backend=backend,
                activation_checkpointing=mode,
            )  # fmt: skip
            results.append((f"{mode} {overrides}", saved.nbytes, estimate.saved))
    return results


def test_encoder_decoder_checkpointing_saved_activations_match_autograd():
    pytest.importorskip("lightning_moe.strategy.parallelize")
    from lightning_moe.strategy.parallelize import _checkpoint_block, transformer_blocks

    S = 7
    for mode in ("full", "experts"):
        torch.manual_seed(0)
        config = t5_config()
        model = EncoderDecoderTransformer(config)
        if mode == "full":
            for block in transformer_blocks(model):
                _checkpoint_block(block)
        else:
            for _, layer in moe_layers(model):
                layer.recompute_experts = True
        src = torch.randint(1, config.vocab_size, (B, S))
        tgt_in, tgt_out = torch.randint(1, config.vocab_size, (B, T)), torch.randint(1, config.vocab_size, (B, T))
        with SavedTensorBytes([model]) as saved:
            logits = model(src, tgt_in, src == 0, tgt_in == 0)
            loss, _, mask = label_smoothed_nll(logits, tgt_out, 0.1, ignore_index=0)
            loss.sum() / mask.sum().clamp_min(1)
        estimate = estimate_activations(
            config, batch_size=B, seq_len=T, source_len=S, precision="32-true", moe_backend="torch",
            activation_checkpointing=mode,
        )  # fmt: skip
        # A checkpointed block saves its inputs (the decoder's: the encoder memory and both padding masks).
        assert estimate.saved == saved.nbytes, mode


def test_dropout_masks_are_one_byte_per_element():
    with_dropout = estimate_activations(gpt_config(moe_every=1, dropout=0.1), batch_size=B, seq_len=T)
    without = estimate_activations(gpt_config(moe_every=1), batch_size=B, seq_len=T)
    # CUDA keeps a bool mask per dropped tensor: the embeddings and two residual branches per block.
    assert with_dropout.saved - without.saved == (1 + 2 * 3) * 32 * B * T


# --------------------------------------------------------------------------------------------
# sharding arithmetic


def test_shard_numel_pads_like_fsdp2():
    assert shard_numel((10, 3), 4) == 3 * 3  # ceil(10 / 4) = 3 rows
    assert shard_numel((8, 3), 4) == 2 * 3
    assert shard_numel((2, 8), 4) == 2 * 2  # 2 < 4 rows: another dim that divides evenly (8) is split
    assert shard_numel((2, 6), 4) == 1 * 6  # ... none does (FSDP2 pads dim 0 only): 1 padded row each
    assert shard_numel((5,), 1) == 5


def test_fsdp_shards_everything_over_n_ranks():
    # Every dim 0 divisible by 8: each rank holds exactly 1/N of the model (non-expert over N ranks,
    # experts over P and then D, P * D = N).
    config = gpt_config(vocab_size=64, max_positions=64, moe_every=1, num_experts=8)
    total = config.total_parameters()
    for P in (1, 2, 4, 8):
        est = estimate_memory(
            config, batch_size=1, seq_len=8, world_size=8, expert_parallel_size=P, precision="bf16-mixed"
        )
        assert est.local_parameters_count * 8 == total
        assert est.parameters == 4 * total // 8  # float32 master weights
        assert est.gradients == 4 * total // 8
        assert est.optimizer_states == 8 * total // 8  # two AdamW moments
    bf16 = estimate_memory(config, batch_size=1, seq_len=8, world_size=8, precision="bf16-true")
    assert bf16.parameters == 2 * total // 8 and bf16.optimizer_states == 4 * total // 8


def test_ddp_replicates_dense_and_splits_experts_over_p():
    config = gpt_config(moe_every=1, num_experts=8)
    experts = sum(p.numel for p in parameter_tensors(config) if p.kind == "expert")
    dense = config.total_parameters() - experts
    est = estimate_memory(config, batch_size=1, seq_len=8, world_size=8, expert_parallel_size=4, data_parallel="ddp")
    assert est.local_parameters_count == dense + experts // 4


def test_fsdp_padding_hand_computed():
    # vocab 61 over 4 ranks: embed [61, 32] -> 16 rows per rank; biases [32] -> 8; experts [4, 32, 64]
    # with P = 2, D = 2: [2, 32, 64] per EP rank -> 1 of 2 experts per rank.
    config = gpt_config(n_layers=2, moe_every=2, max_positions=30, activation="gelu")
    D, F_ = 32, 64
    expected = 16 * D  # embed
    expected += 8 * D  # positions [30, 32]: ceil(30 / 4) = 8 rows
    for _ in range(2):  # blocks: norms (4 vectors), attention (4 matrices, 4 biases)
        expected += 4 * 8 + 4 * (8 * D + 8)
    expected += 16 * D + 16 * D  # dense FFN (block 0): w1 [64, 32], w2 [32, 64]
    expected += 1 * D  # router [4, 32]: 1 row per rank
    expected += 2 * (1 * D * F_)  # experts w1 [2, 32, 64] and w2 [2, 64, 32] over D = 2
    expected += 2 * 8  # final norm
    est = estimate_memory(config, batch_size=1, seq_len=8, world_size=4, expert_parallel_size=2, precision="32-true")
    assert est.local_parameters_count == expected


_SHARD_CASES = {
    2: [
        dict(P=2, mode="fsdp", model=dict()),
        dict(P=1, mode="fsdp", model=dict(activation="gelu", num_shared_experts=1)),
        dict(P=2, mode="ddp", model=dict(moe_every=1)),
    ],
    4: [
        dict(P=1, mode="fsdp", model=dict(num_experts=2, top_k=1)),  # 2 experts over D = 4: split on dim 2
        dict(P=2, mode="fsdp", model=dict(moe_every=1, vocab_size=64)),
    ],
}


def _shard_worker(world: int) -> None:
    """Each rank's bytes of parameter storage after the strategy's parallelize, against the estimate."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.tensor import DTensor

    from lightning_moe.strategy.mesh import ParallelDims
    from lightning_moe.strategy.parallelize import ParallelizeConfig, parallelize

    dist.init_process_group("gloo")
    out = []
    for case in _SHARD_CASES[world]:
        config = gpt_config(**case["model"])
        holder = nn.Module()
        holder.model = GPT(config)
        dims = ParallelDims(world, case["P"], 1, case["mode"])
        parallelize(holder, ParallelizeConfig(dims=dims, mesh=dims.build_mesh("cpu")))
        storages = {}
        for param in holder.parameters():  # FSDP2 keeps each padded shard in its own storage
            local = param.to_local() if isinstance(param, DTensor) else param
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        estimate = estimate_memory(
            config, batch_size=1, seq_len=8, world_size=world, expert_parallel_size=case["P"],
            data_parallel=case["mode"], precision="32-true",
        )  # fmt: skip
        out.append((str(case), sum(storages.values()), estimate.parameters))
    if dist.get_rank() == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_estimated_shards_are_the_strategy_shards(world):
    pytest.importorskip("lightning_moe.strategy.parallelize")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
           __file__, "shards", str(world)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, measured, estimated in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert measured == estimated, case


@pytest.mark.distributed
def test_memory_check_script_through_the_strategy(tmp_path):
    """benchmarks/memory_check.py --cpu-smoke: the strategy's training steps save what the ledger says."""
    pytest.importorskip("lightning_moe.strategy.parallelize")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_check.py"), "--cpu-smoke", "--no-search",
           "--cases", "ddp,fsdp+ac_full", "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "memory_check.json").read_text())
    assert (tmp_path / "memory_check.csv").exists()
    assert [r["name"] for r in report["results"]] == ["ddp", "fsdp+ac_full"]
    for result in report["results"]:
        assert result["ok"], result.get("error")
        saved = result["steps"][1]["saved_tensor_bytes"]  # the second step, through FSDP2 (world 1, gloo)
        assert saved == result["estimate"]["activations_saved"], result["name"]


def test_cpu_offload_moves_states_to_pinned_host_memory():
    config = gpt_config(moe_every=1)
    on_gpu = estimate_memory(config, batch_size=2, seq_len=8, world_size=1, precision="32-true")
    off = estimate_memory(config, batch_size=2, seq_len=8, world_size=1, precision="32-true", cpu_offload=True)
    assert off.parameters == off.gradients == off.optimizer_states == off.optimizer_step == 0
    pinned = sum(1 << (4 * p.numel - 1).bit_length() for p in parameter_tensors(config))
    assert off.host_parameters == off.host_gradients == pinned
    assert off.host_optimizer_states == on_gpu.optimizer_states
    assert off.activations == on_gpu.activations
    assert off.total < on_gpu.total


def test_bad_layouts_are_named():
    config = gpt_config(num_experts=6)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by expert_parallel_size=4"):
        estimate_memory(config, batch_size=1, seq_len=8, world_size=8, expert_parallel_size=4)
    with pytest.raises(ValueError, match="not divisible by expert_parallel_size=3"):
        estimate_memory(config, batch_size=1, seq_len=8, world_size=4, expert_parallel_size=3)
    with pytest.raises(ValueError, match="precision='16-mixed'"):
        estimate_memory(config, batch_size=1, seq_len=8, world_size=1, precision="16-mixed")
    with pytest.raises(ValueError, match="activation_checkpointing='selective'"):
        estimate_memory(config, batch_size=1, seq_len=8, world_size=1, activation_checkpointing="selective")


# --------------------------------------------------------------------------------------------
# the command


def _recipe_module(path: Path) -> str:
    return yaml.safe_load(path.read_text())["model"]["class_path"].rpartition(".")[2]


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ESTIMATED = [p.name for p in RECIPES if _recipe_module(p) in MODULE_CONFIGS]


def test_recipes_of_other_modules_are_refused_by_name(capsys):
    others = [p for p in RECIPES if _recipe_module(p) not in MODULE_CONFIGS]  # e.g. hf_finetune (CausalLMModule)
    for path in others:
        with pytest.raises(SystemExit) as exc:
            cli_main(["estimate-memory", "-c", str(path)])
        assert exc.value.code == 2
        assert f"{_recipe_module(path)}' is not one of" in capsys.readouterr().err
    assert ESTIMATED, "no shipped recipe of LanguageModelModule or MultitaskTranslationModule"


@pytest.mark.parametrize("recipe", ESTIMATED)
def test_estimate_memory_command_on_shipped_recipes(recipe, capsys):
    path = ROOT / "recipes" / recipe
    with pytest.raises(SystemExit) as exc:
        cli_main(["estimate-memory", "-c", str(path), "--devices", "4", "--expert_parallel_size", "2", "--json"])
    assert exc.value.code == 0
    result = json.loads(capsys.readouterr().out)
    config = model_config_from_recipe(yaml.safe_load(path.read_text()))
    assert result["parameters_count"] == config.total_parameters()
    assert result["total"] == max(result["phases"].values())
    with pytest.raises(SystemExit):
        cli_main(["estimate-memory", "-c", str(path), "--devices", "2", "--cpu_offload", "--unit", "MiB"])
    table = capsys.readouterr().out
    assert "host memory (training state)" in table and "peak (" in table


def test_estimate_memory_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["estimate-memory", "-c", str(tmp_path / "missing.yaml")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["estimate-memory", "-c", str(ROOT / "recipes" / "m3_tiny.yaml"), "--devices", "3"])
    assert exc.value.code == 0  # P defaults to gcd(3 devices, 8 experts) = 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(
            ["estimate-memory", "-c", str(ROOT / "recipes" / "m3_tiny.yaml"), "--devices", "3",
             "--expert_parallel_size", "2"]
        )  # fmt: skip
    assert exc.value.code == 2 and "not divisible by expert_parallel_size=2" in capsys.readouterr().err


def test_recipe_with_nested_config_is_read():
    recipe = {
        "model": {
            "class_path": "lightning_moe.modules.LanguageModelModule",
            "init_args": {"config": {"d_model": 64, "n_heads": 4, "n_layers": 2, "num_experts": 4}},
        },
        "data": {"init_args": {"vocab_size": 100, "batch_size": 2, "seq_len": 16}},
    }
    config = model_config_from_recipe(recipe)
    assert (config.d_model, config.n_layers, config.num_experts, config.vocab_size) == (64, 2, 4, 100)


def test_docs_memory_examples_run_and_match_the_tables():
    import re

    text = (ROOT / "docs" / "memory.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    first: dict = {}
    exec(compile(blocks[0], "docs/memory.md", "exec"), first)
    estimate = first["estimate"]
    assert f"{estimate.total / 1024**3:.2f} GiB" in text  # the printed table quoted on the page
    paper: dict = {}
    exec(compile(blocks[1], "docs/memory.md", "exec"), paper)
    for E, values in paper["rows"].items():
        cells = [f"{values[0]:.2f}T"] + [f"{v:.1f} GiB" for v in values[1:]]
        row = next(line for line in text.splitlines() if line.startswith(f"| {E} |"))
        assert all(cell in row for cell in cells), (row, cells)
    # the conclusions drawn on the page
    rows = paper["rows"]
    assert rows[448][1] < 39 < rows[512][1]  # largest without offload among the rows: E = 448
    assert rows[1536][4] < 112.5 < rows[1536][3] < 128 < rows[2048][3]


if __name__ == "__main__" and sys.argv[1:2] == ["checkpointing"]:  # the TRITON_INTERPRET=1 child
    print(json.dumps(_checkpointing_cases(sys.argv[2])))
if __name__ == "__main__" and sys.argv[1:2] == ["shards"]:  # a torchrun rank
    _shard_worker(int(sys.argv[2]))
