"""Write a tiny random Hugging Face MoE model directory (config, safetensors, tokenizer.json) to try recipes on.

The tokenizer is a small byte-level BPE trained on the bundled corpus; the model has random
weights (it learns only what the fine-tuning run teaches it). Needs ``transformers`` (the test extra).

    python scripts/make_tiny_hf_model.py --family mixtral --out checkpoints/tiny-mixtral
"""

from __future__ import annotations

import argparse

import torch

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "llama", "qwen3")


def train_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the bundled corpus, with ``</s>``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lightning_moe.data import bundled_corpus_dir, read_corpus

    texts = sorted({t for e in read_corpus(bundled_corpus_dir())["train"] for t in (e.src, e.tgt)})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def tiny_config(family: str, vocab_size: int, eos: int):
    """A 2-layer, width-64 config of ``family``."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip
    moe = dict(num_experts_per_tok=2)
    return {
        "mixtral": lambda: tf.MixtralConfig(**common, **moe, intermediate_size=128, num_local_experts=4),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **common, **moe, intermediate_size=128, moe_intermediate_size=64, num_experts=8, norm_topk_prob=True
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **common,
            **moe,
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=4,
        ),
        "olmoe": lambda: tf.OlmoeConfig(**common, **moe, intermediate_size=64, num_experts=8),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            **moe,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
        "llama": lambda: tf.LlamaConfig(**common, intermediate_size=128),
        "qwen3": lambda: tf.Qwen3Config(**common, intermediate_size=128),
    }[family]()


def main(argv: list[str] | None = None) -> None:
    """Build and save the model and its tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="mixtral")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import transformers as tf

    tokenizer = train_tokenizer(args.vocab_size)
    torch.manual_seed(args.seed)
    config = tiny_config(args.family, len(tokenizer), tokenizer.eos_token_id)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(
        f"wrote a tiny random {args.family} model ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.out}"
    )


if __name__ == "__main__":
    main()
