"""Tests of the MoE transformers: configs and parameter counts, masks, KV cache, greedy and beam search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.models import (
    GPT,
    EncoderDecoderTransformer,
    GPTConfig,
    TransformerConfig,
    beam_search,
    greedy_search,
)
from lightning_moe.moe import MoE

PAD, BOS, EOS, V = 0, 1, 2, 16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on shared CPUs
    yield
    torch.set_num_threads(threads)


def _tiny(**overrides) -> TransformerConfig:
    kwargs = {
        "vocab_size": V, "d_model": 32, "n_heads": 4, "d_ff": 48, "n_encoder_layers": 2, "n_decoder_layers": 2,
        "num_experts": 4, "capacity_factor": None, "dropout": 0.0, "max_positions": 64,
    }  # fmt: skip
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_experts": 0},
        {"moe_every": 0},
        {},
        {"activation": "swiglu", "positions": "learned"},
        {"activation": "relu", "expert_ffn_size": 24, "top_k": 1, "num_shared_experts": 2},
        {"moe_encoder_layers": [0, 1], "moe_decoder_layers": [], "n_encoder_layers": 3},
        {"moe_every": 1, "n_decoder_layers": 3},
    ],
)
def test_transformer_config_counts_match_built_model(overrides):
    cfg = _tiny(**overrides)
    model = EncoderDecoderTransformer(cfg)
    assert cfg.total_parameters() == _count(model)
    inactive = sum((m.num_experts - m.top_k) * m.experts.w1[0].numel() * (3 if m.experts.w3 is not None else 2)
                   for m in model.moe_layers())  # fmt: skip
    assert cfg.active_parameters_per_token() == _count(model) - inactive
    if cfg.num_experts == 0 or cfg.moe_every == 0:
        assert not list(model.moe_layers())
        assert cfg.active_parameters_per_token() == cfg.total_parameters()


@pytest.mark.parametrize(
    "overrides",
    [{"num_experts": 0}, {}, {"positions": "sinusoidal", "activation": "swiglu"}, {"moe_layers": [0, 2]}],
)
def test_gpt_config_counts_match_built_model(overrides):
    kwargs = {"vocab_size": V, "d_model": 32, "n_heads": 4, "d_ff": 48, "n_layers": 3, "num_experts": 4}
    cfg = GPTConfig(**{**kwargs, **overrides})
    model = GPT(cfg)
    assert cfg.total_parameters() == _count(model)
    inactive = sum((m.num_experts - m.top_k) * m.experts.w1[0].numel() * (3 if m.experts.w3 is not None else 2)
                   for m in model.moe_layers())  # fmt: skip
    assert cfg.active_parameters_per_token() == _count(model) - inactive


def test_every_other_layer_is_moe_by_default():
    cfg = _tiny(n_encoder_layers=6, n_decoder_layers=4)
    assert cfg.encoder_moe_indices() == [1, 3, 5]
    assert cfg.decoder_moe_indices() == [1, 3]
    model = EncoderDecoderTransformer(cfg)
    assert [b.is_moe for b in model.encoder] == [False, True] * 3
    assert len(list(model.moe_layers())) == 5
    assert GPTConfig(vocab_size=V, n_layers=4, moe_layers=[3, 0]).moe_indices() == [0, 3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 5}, "d_model=32 is not divisible by n_heads=5"),
        ({"top_k": 5}, "top_k=5 must be between 1 and num_experts=4"),
        ({"moe_encoder_layers": [2]}, "outside"),
        ({"moe_decoder_layers": [1], "num_experts": 0}, "num_experts=0"),
        ({"positions": "rotary"}, "positions='rotary'"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"activation": "tanh"}, "activation='tanh'"),
    ],
)
def test_config_errors_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _tiny(**overrides)


# ----------------------------------------------------------------------------- forward, masks, cache


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(_tiny()).eval()
    src = torch.randint(3, V, (1, 5))
    padded = torch.cat([src, torch.full((1, 3), PAD)], dim=1)
    with torch.no_grad():
        clean = model.encode(src)
        noisy = model.encode(padded, padded == PAD)
    torch.testing.assert_close(noisy[:, :5], clean, atol=1e-5, rtol=1e-5)


def test_cached_decoding_matches_teacher_forcing():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(_tiny(positions="learned")).eval()
    src, tgt = torch.randint(3, V, (3, 6)), torch.randint(3, V, (3, 7))
    src[0, 4:] = PAD
    with torch.no_grad():
        full = model(src, tgt, src == PAD)
        memory = model.encode(src, src == PAD)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, t : t + 1], memory, src == PAD, cache=cache) for t in range(tgt.shape[1])]
    assert cache.length == tgt.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_moe_aux_loss_sums_layers_and_backpropagates():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(_tiny(capacity_factor=1.25))
    src, tgt = torch.randint(3, V, (2, 5)), torch.randint(3, V, (2, 4))
    assert float(model.moe_aux_loss()) == 0.0  # before any forward
    model(src, tgt).sum()
    layers = list(model.moe_layers())
    assert len(layers) == 2
    total = model.moe_aux_loss()
    torch.testing.assert_close(total, sum(m.aux_loss for m in layers))
    total.backward()
    assert all(m.router.weight.grad is not None for m in layers)
    dense = EncoderDecoderTransformer(_tiny(num_experts=0))
    dense(src, tgt)
    assert float(dense.moe_aux_loss()) == 0.0


def test_position_limit_error():
    model = EncoderDecoderTransformer(_tiny(max_positions=8))
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(torch.randint(3, V, (1, 9)))


# ----------------------------------------------------------------------------- generation


def _reverse_batch(B: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources of 2-7 tokens; the target is the source reversed, then EOS."""
    lens = torch.randint(2, 8, (B,), generator=generator)
    src, tgt_in, tgt_out = (torch.full((B, n), PAD) for n in (8, 9, 9))
    for b, n in enumerate(lens.tolist()):
        toks = torch.randint(3, V, (n,), generator=generator)
        src[b, :n], tgt_in[b, 0], tgt_in[b, 1 : n + 1] = toks, BOS, toks.flip(0)
        tgt_out[b, :n], tgt_out[b, n] = toks.flip(0), EOS
    return src, tgt_in, tgt_out


@pytest.fixture(scope="module")
def trained_model() -> EncoderDecoderTransformer:
    """A tiny MoE model trained briefly to reverse sequences: varied outputs and EOS at varied steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = EncoderDecoderTransformer(_tiny())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        src, tgt_in, tgt_out = _reverse_batch(32, generator)
        logits = model(src, tgt_in, src == PAD, tgt_in == PAD)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        (loss + model.moe_aux_loss()).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    src, _, _ = _reverse_batch(8, torch.Generator().manual_seed(1))
    return src


def test_greedy_with_cache_equals_without(trained_model, sources):
    kwargs = {"start_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 12}
    cached = greedy_search(trained_model, sources, **kwargs)
    uncached = greedy_search(trained_model, sources, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    ends = [row.index(EOS) if EOS in row else None for row in cached.tolist()]
    assert len({e for e in ends if e is not None}) > 1, "the test needs EOS at different steps"
    assert all(t == PAD for row, e in zip(cached.tolist(), ends, strict=True) if e is not None for t in row[e + 1 :])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_with_cache_equals_without(trained_model, sources, length_penalty):
    kwargs = {"start_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 12, "beam_size": 3}
    cached = beam_search(trained_model, sources, length_penalty=length_penalty, **kwargs)
    uncached = beam_search(trained_model, sources, length_penalty=length_penalty, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_beam_size_one_equals_greedy(trained_model, sources):
    kwargs = {"start_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 12}
    assert torch.equal(
        beam_search(trained_model, sources, beam_size=1, **kwargs), greedy_search(trained_model, sources, **kwargs)
    )
    # Also when max_length cuts hypotheses short.
    short = {**kwargs, "max_length": 3}
    assert torch.equal(
        beam_search(trained_model, sources, beam_size=1, **short), greedy_search(trained_model, sources, **short)
    )


def _sequence_logprob(model: EncoderDecoderTransformer, src: torch.Tensor, hyp: list[int]) -> float:
    tgt_in = torch.tensor([[BOS, *hyp[:-1]]])
    with torch.no_grad():
        lprobs = torch.log_softmax(model(src[None], tgt_in, (src == PAD)[None]).float(), dim=-1)
    return float(lprobs[0, torch.arange(len(hyp)), torch.tensor(hyp)].sum())


def test_beam_search_scores_at_least_greedy(trained_model, sources):
    kwargs = {"start_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 12}
    greedy = greedy_search(trained_model, sources, **kwargs).tolist()
    beam = beam_search(trained_model, sources, beam_size=4, length_penalty=0.0, **kwargs).tolist()
    for src, g, b in zip(sources, greedy, beam, strict=True):
        g, b = (row[: row.index(EOS) + 1] if EOS in row else row for row in (g, b))
        if EOS in g:  # beam keeps the greedy prefix alive unless something scores better
            assert _sequence_logprob(trained_model, src, b) >= _sequence_logprob(trained_model, src, g) - 1e-4


def test_sync_finished_keeps_decoding_until_all_processes_agree(trained_model, sources):
    kwargs = {"start_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 12}
    calls = []

    def never_done(done: bool) -> bool:  # as if another process still had live sentences
        calls.append(done)
        return False

    alone = greedy_search(trained_model, sources, **kwargs)
    synced = greedy_search(trained_model, sources, sync_finished=never_done, **kwargs)
    assert len(calls) == 12 and synced.shape[1] == 12
    assert torch.equal(synced[:, : alone.shape[1]], alone)
    assert bool((synced[:, alone.shape[1] :] == PAD).all())
    calls.clear()
    beam = beam_search(trained_model, sources, beam_size=2, **kwargs)
    assert torch.equal(beam_search(trained_model, sources, beam_size=2, sync_finished=never_done, **kwargs), beam)
    assert len(calls) == 11  # every step but the last (max_length ends the loop by itself)


def test_generation_start_ids_per_row(trained_model, sources):
    kwargs = {"eos_id": EOS, "pad_id": PAD, "max_length": 6}
    per_row = greedy_search(trained_model, sources, start_id=torch.full((sources.shape[0],), BOS), **kwargs)
    assert torch.equal(per_row, greedy_search(trained_model, sources, start_id=BOS, **kwargs))
    with pytest.raises(ValueError, match="start_id has shape"):
        greedy_search(trained_model, sources, start_id=torch.tensor([BOS]), **kwargs)


# ----------------------------------------------------------------------------- GPT


def test_gpt_cached_generation_matches_recompute():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, d_model=32, n_heads=4, d_ff=48, n_layers=2, num_experts=4, capacity_factor=None,
                    dropout=0.0, max_positions=32)  # fmt: skip
    model = GPT(cfg).eval()
    for p in model.parameters():  # a random model with a near-uniform output would repeat one token
        p.data.normal_(0.0, 0.3)
    prompt = torch.randint(0, V, (3, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert isinstance(next(model.moe_layers()), MoE)
