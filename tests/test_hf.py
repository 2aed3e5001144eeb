"""lightning_moe.hf against transformers: tiny random models of every family, float32, no network."""

import json
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers as tf
from hf_tiny import DENSE_FAMILIES, FAMILIES, VOCAB, save_tiny
from safetensors.torch import load_file, save_file

from lightning_moe.hf import hf_decoder_config, load_hf_model, load_hf_tokenizer, load_hf_weights, save_hf_model
from lightning_moe.models import MoEDecoder
from lightning_moe.moe import ExpertParallelGroup


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ids(seed=1, B=2, T=16):
    return torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES + DENSE_FAMILIES)
def test_logits_and_greedy_generation_match_transformers(tmp_path, family):
    hf = save_tiny(family, tmp_path)
    model = load_hf_model(tmp_path)
    assert model.config.family == family
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert _rel_err(out, ref) < 1e-5
    prompt = ids[:, :5]
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(model.generate(prompt, 20), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_per_expert_layouts_load_the_same_model(tmp_path, family):
    save_tiny(family, tmp_path / "per_expert")
    save_tiny(family, tmp_path / "fused", fused=True)
    names_per_expert = set(load_file(tmp_path / "per_expert" / "model.safetensors"))
    names_fused = set(load_file(tmp_path / "fused" / "model.safetensors"))
    assert any(".experts.0." in n for n in names_per_expert)
    assert any(n.endswith("experts.gate_up_proj") for n in names_fused)
    a, b = load_hf_model(tmp_path / "per_expert"), load_hf_model(tmp_path / "fused")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("family", FAMILIES + DENSE_FAMILIES)
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_save_then_transformers_load_gives_identical_tensors(tmp_path, family, layout):
    hf = save_tiny(family, tmp_path / "src")
    model = load_hf_model(tmp_path / "src")
    save_hf_model(model, tmp_path / "out", layout=layout)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected, got = hf.state_dict(), reloaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # our config survives the round trip
    assert hf_decoder_config(tmp_path / "out") == hf_decoder_config(tmp_path / "src")


def _rewrite(path, drop=(), add=None, replace=None):
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, file, metadata={"format": "pt"})


def test_deleted_expert_tensor_is_an_error_naming_it(tmp_path):
    save_tiny("qwen3_moe", tmp_path)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    _rewrite(tmp_path, drop=[name])
    with pytest.raises(ValueError, match="missing.*" + re.escape(name)):
        load_hf_model(tmp_path)


def test_deleted_fused_expert_tensor_is_an_error_naming_it(tmp_path):
    save_tiny("mixtral", tmp_path, fused=True)
    _rewrite(tmp_path, drop=["model.layers.0.mlp.experts.down_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj"):
        load_hf_model(tmp_path)


def test_unexpected_and_misshaped_tensors_are_errors_naming_them(tmp_path):
    save_tiny("mixtral", tmp_path)
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"  # a fifth expert the config does not have
    _rewrite(tmp_path, add={extra: torch.zeros(48, 32)})
    with pytest.raises(ValueError, match="not used.*" + re.escape(extra)):
        load_hf_model(tmp_path)
    save_tiny("mixtral", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(tmp_path, replace={name: torch.zeros(8, 32)})
    with pytest.raises(ValueError, match="wrong shape.*" + re.escape(f"{name} (8, 32) (expected (16, 32))")):
        load_hf_model(tmp_path)


def test_known_extras_are_skipped_by_name_only(tmp_path):
    # DeepSeek-V3 releases carry a multi-token-prediction layer after the last decoder layer.
    save_tiny("deepseek_v3", tmp_path, num_nextn_predict_layers=1)
    _rewrite(tmp_path, add={"model.layers.2.eh_proj.weight": torch.zeros(32, 64)})
    load_hf_model(tmp_path)
    _rewrite(tmp_path, add={"model.layers.1.eh_proj.weight": torch.zeros(32, 64)})  # not an MTP layer
    with pytest.raises(ValueError, match=r"model\.layers\.1\.eh_proj\.weight"):
        load_hf_model(tmp_path)


def test_sharded_files_with_index_round_trip(tmp_path):
    hf = save_tiny("olmoe", tmp_path / "src")
    model = load_hf_model(tmp_path / "src")
    save_hf_model(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_hf_model(tmp_path / "out")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_dtype_and_overrides(tmp_path):
    save_tiny("deepseek_v3", tmp_path)
    model = load_hf_model(tmp_path, dtype=torch.bfloat16, capacity_factor=1.5, bias_update_rate=1e-3)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    moe = next(model.moe_layers())
    assert moe.router.expert_bias.dtype == torch.float32  # the correction bias stays float32
    assert moe.router.capacity_factor == 1.5 and moe.router.bias_update_rate == 1e-3
    with pytest.raises(ValueError, match="unknown DecoderConfig field"):
        load_hf_model(tmp_path, capacity_factr=1.5)


def test_unsupported_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_model(tmp_path)
    save_tiny("mixtral", tmp_path, sliding_window=8)
    with pytest.raises(ValueError, match="sliding"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf_model(tmp_path)


def test_tokenizer_json_loads_through_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "mixture of experts", "hello experts"], trainers.BpeTrainer(vocab_size=60))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(tmp_path)
    loaded = load_hf_tokenizer(tmp_path)
    text = "hello mixture of experts world"
    assert loaded.encode(text) == loaded.backend_tokenizer.encode(text).ids == fast(text)["input_ids"]


# --- expert parallelism: 2 processes over gloo ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank, world, port, cases, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from lightning_moe.hf import io

    original = io.SafetensorsDirectory.read
    for name in cases:
        src = os.path.join(out_dir, name, "src")
        reads = []

        def recording_read(self, tensor, rows=None, reads=reads):
            reads.append((tensor, rows))
            return original(self, tensor, rows)

        io.SafetensorsDirectory.read = recording_read
        with torch.device("meta"):
            model = MoEDecoder(hf_decoder_config(src))
        for moe in model.moe_layers():
            moe.shard_experts(ExpertParallelGroup(group=dist.group.WORLD, size=world, rank=rank))
        load_hf_weights(model, src)
        io.SafetensorsDirectory.read = original
        model.eval()
        with torch.no_grad():
            logits = model(_ids(seed=rank))  # each rank its own batch; tokens cross ranks to their experts
        save_hf_model(model, os.path.join(out_dir, name, "saved"))  # each rank writes its own experts
        torch.save({"logits": logits, "reads": reads}, os.path.join(out_dir, name, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_load_matches_one_process_and_reads_only_local_experts(tmp_path):
    cases = {"qwen2_moe": False, "deepseek_v3": True}  # (family, fused layout): per-expert files; get_slice rows
    hf = {family: save_tiny(family, tmp_path / family / "src", fused=fused) for family, fused in cases.items()}
    mp.spawn(_ep_worker, args=(2, _free_port(), list(cases), str(tmp_path)), nprocs=2)
    for family, fused in cases.items():
        model = load_hf_model(tmp_path / family / "src")
        E = model.config.num_experts
        for rank in range(2):
            res = torch.load(tmp_path / family / f"rank{rank}.pt")
            with torch.no_grad():
                expected = model(_ids(seed=rank))
            assert _rel_err(res["logits"], expected) < 1e-5
            lo, hi = rank * E // 2, (rank + 1) * E // 2
            expert_reads = [(name, rows) for name, rows in res["reads"] if ".experts." in name]
            assert expert_reads
            for name, rows in expert_reads:
                if fused:
                    assert rows == (lo, hi), (name, rows)
                else:
                    e = int(name.split(".experts.")[1].split(".")[0])
                    assert lo <= e < hi, (rank, name)
        # the expert-sharded save: one file per rank, loadable by transformers, identical tensors
        saved = tmp_path / family / "saved"
        index = json.loads((saved / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        reloaded = tf.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        for name, tensor in hf[family].state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
