"""``DecoderConfig``: one self-validating configuration for the decoder blocks of the published MoE families.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 (and the dense Llama and Qwen3 that
upcycling starts from) are one architecture with switches: RMSNorm, rotary positions, grouped-query
attention or DeepSeek's multi-head latent attention (MLA), optional q/k norms, SwiGLU experts,
optional shared experts, and the router options of :class:`~lightning_moe.moe.Router`. Each field
says which family uses it; ``lightning_moe.hf`` fills it in from a ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_moe.models.rope import ROPE_TYPES
from lightning_moe.moe.router import validate_router_options

QK_NORMS = ("head", "full")
MOE_BACKENDS = ("auto", "torch", "triton")


@dataclass(kw_only=True)
class DecoderConfig:
    """Configuration of :class:`~lightning_moe.models.MoEDecoder`.

    Args:
        vocab_size: V.
        d_model: D, model width (``hidden_size``).
        n_layers: decoder blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention); ``None``: ``n_heads``.
        head_dim: width of a head; ``None``: ``d_model // n_heads``.
        d_ff: hidden width of the dense SwiGLU FFNs (layers that are not MoE).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: rotary base wavelength.
        rope_scaling: rotary frequency scaling, ``None`` or a dict with ``rope_type`` in
            ``("linear", "llama3", "yarn")`` and its fields (as in a Hugging Face config).
        rope_interleaved: rotate interleaved pairs (DeepSeek) instead of halves (Llama).
        max_positions: longest sequence (``max_position_embeddings``).
        qkv_bias: biases on the q/k/v projections (Qwen2-MoE; Llama-style ``attention_bias``); with
            MLA, on the two compressing projections (DeepSeek's ``attention_bias``).
        out_bias: bias on the attention output projection.
        qk_norm: ``None``; ``"head"``: RMSNorm over each head's q and k (Qwen3); ``"full"``: RMSNorm
            over the whole q and k projections (OLMoE).
        clip_qkv: clamp q, k and v to ``[-clip_qkv, clip_qkv]`` (OLMoE option); ``None`` is off.
        q_lora_rank: MLA: rank of the query compression; ``None``: a full query projection.
        kv_lora_rank: MLA: rank of the joint key/value compression; ``None`` is standard attention.
        qk_nope_head_dim: MLA: per-head query/key dimensions without rotary positions.
        qk_rope_head_dim: MLA: per-head query/key dimensions with rotary positions (shared key).
        v_head_dim: MLA: per-head value width.
        tie_embeddings: the output projection is the token embedding.
        moe_layers: indices of the layers whose FFN is an MoE layer; ``None``: every layer.
        num_experts: E routed experts per MoE layer; 0 makes every layer dense.
        top_k: experts per token.
        expert_ffn_size: hidden width of each routed expert; ``None``: ``d_ff``.
        num_shared_experts: shared experts every token passes through (0 = none).
        shared_expert_ffn_size: width of the shared FFN; ``None``: ``num_shared_experts * expert_ffn_size``.
        shared_expert_gate: sigmoid gate on the shared FFN's output (Qwen2-MoE).
        score_function: router scores, ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3).
        normalize_top_k: renormalise the kept router weights (Mixtral, Qwen3-MoE, DeepSeek-V3: True;
            OLMoE, Qwen2-MoE: False); ``None``: only for ``top_k >= 2``.
        routed_scaling_factor: constant factor on the routed experts' weights (DeepSeek-V3).
        expert_groups: expert groups of group-limited top-k (DeepSeek-V3 ``n_group``).
        top_groups: groups a token may choose from (``topk_group``); ``None``: all.
        expert_bias: per-expert correction bias for selection (DeepSeek-V3).
        bias_update_rate: aux-loss-free balancing step of that bias (0 keeps it fixed).
        capacity_factor: ``None`` (dropless, what the published models compute) or a training
            capacity factor.
        eval_capacity_factor: capacity factor in eval and decoding; ``None`` is dropless.
        min_capacity: lower bound on slots per expert in capacity mode.
        random_token_selection: Random Token Selection in capacity mode.
        router_jitter: multiplicative router input jitter, training only.
        aux_loss_weight: weight of each layer's load-balancing loss.
        z_loss_weight: weight of each layer's router z-loss.
        moe_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        family: the published architecture this follows, as its Hugging Face ``model_type``
            (``"mixtral"``, ``"qwen3_moe"``, ...); :func:`~lightning_moe.hf.save_hf_model` writes
            that format. ``None`` for a model of no published family.
        bos_token_id: beginning-of-sequence token, carried to and from ``config.json``.
        eos_token_id: end-of-sequence token(s).
        pad_token_id: padding token.
        extra: other ``config.json`` fields, written back unchanged when saving.

    Raises:
        ValueError: on an inconsistent setting, naming the value and the fix.
    """

    # --- size and attention ---------------------------------------------------------------------
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleaved: bool = False
    max_positions: int = 4096
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None
    # --- multi-head latent attention (DeepSeek) ---------------------------------------------------
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tie_embeddings: bool = False
    # --- MoE ------------------------------------------------------------------------------------
    moe_layers: list[int] | None = None
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int | None = None
    num_shared_experts: int = 0
    shared_expert_ffn_size: int | None = None
    shared_expert_gate: bool = False
    score_function: str = "softmax"
    normalize_top_k: bool | None = True
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1
    top_groups: int | None = None
    expert_bias: bool = False
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    random_token_selection: bool = False
    router_jitter: float = 0.0
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    moe_backend: str = "auto"
    # --- provenance -------------------------------------------------------------------------------
    family: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0):
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention); "
                "choose a divisor, or None for n_heads"
            )
        if self.head_dim is None and not self.is_mla and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly "
                "or choose n_heads that divides d_model"
            )
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; choose None or one of {QK_NORMS}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported types are {ROPE_TYPES}")
        if self.is_mla:
            if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2 or self.qk_nope_head_dim < 0:
                raise ValueError(
                    f"MLA needs an even qk_rope_head_dim >= 2 and qk_nope_head_dim >= 0 (got "
                    f"{self.qk_rope_head_dim}, {self.qk_nope_head_dim})"
                )
            if self.v_head_dim < 1:
                raise ValueError(f"v_head_dim={self.v_head_dim} must be positive with MLA (kv_lora_rank set)")
            if self.qk_norm is not None:
                raise ValueError("qk_norm is not used with MLA (kv_lora_rank set); set qk_norm=None")
        elif self.attention_head_dim % 2:
            raise ValueError(f"head_dim={self.attention_head_dim} must be even for rotary positions")
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0; 0 makes the model dense")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"moe_layers={self.moe_layers} holds indices {bad} outside [0, {self.n_layers})")
            if self.moe_layers and self.num_experts == 0:
                raise ValueError(f"moe_layers={self.moe_layers} asks for MoE layers but num_experts=0")
        if self.num_experts > 0:
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
            validate_router_options(
                self.num_experts, self.top_k, self.score_function, self.routed_scaling_factor, self.expert_groups,
                self.top_groups, self.expert_bias, self.bias_update_rate,
            )  # fmt: skip
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r} is not supported; choose one of {MOE_BACKENDS}")

    # --- derived sizes ----------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (``kv_lora_rank`` is set)."""
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attention_head_dim(self) -> int:
        """Width of a query/key head of standard attention."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head."""
        return self.qk_rope_head_dim if self.is_mla else self.attention_head_dim

    @property
    def renormalizes(self) -> bool:
        """Whether the router renormalises the kept weights (``normalize_top_k``, or ``top_k >= 2`` when None)."""
        return self.top_k > 1 if self.normalize_top_k is None else self.normalize_top_k

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Hidden width of each routed expert."""
        return self.d_ff if self.expert_ffn_size is None else self.expert_ffn_size

    def moe_indices(self) -> list[int]:
        """Indices of the layers whose FFN is an MoE layer."""
        if self.num_experts == 0:
            return []
        return list(range(self.n_layers)) if self.moe_layers is None else sorted(self.moe_layers)

    def moe_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`lightning_moe.moe.MoE` for one MoE layer of this model."""
        return {
            "hidden_size": self.d_model,
            "ffn_hidden_size": self.expert_ffn_hidden_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity,
            "random_token_selection": self.random_token_selection,
            "router_jitter": self.router_jitter,
            "aux_loss_weight": self.aux_loss_weight,
            "z_loss_weight": self.z_loss_weight,
            "activation": "swiglu",
            "backend": self.moe_backend,
            "num_shared_experts": self.num_shared_experts,
            "shared_expert_ffn_size": self.shared_expert_ffn_size,
            "shared_expert_gate": self.shared_expert_gate,
            "score_function": self.score_function,
            "normalize_top_k": self.normalize_top_k,
            "routed_scaling_factor": self.routed_scaling_factor,
            "expert_groups": self.expert_groups,
            "top_groups": self.top_groups,
            "expert_bias": self.expert_bias,
            "bias_update_rate": self.bias_update_rate,
        }

    # --- parameter arithmetic (tested against the built model) -------------------------------------
    def _attention_parameters(self) -> int:
        D, N = self.d_model, self.n_heads
        if self.is_mla:
            assert self.kv_lora_rank is not None
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank is None:
                q = D * N * qk
            else:
                q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * N * qk
            kv = D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * N * (self.qk_nope_head_dim + self.v_head_dim)
            out = N * self.v_head_dim * D
            bias = (self.q_lora_rank or 0) + self.kv_lora_rank + self.qk_rope_head_dim if self.qkv_bias else 0
            return q + kv + out + bias + (D if self.out_bias else 0)
        Hd, Nk = self.attention_head_dim, self.kv_heads
        n = D * N * Hd + 2 * D * Nk * Hd + N * Hd * D
        if self.qkv_bias:
            n += N * Hd + 2 * Nk * Hd
        if self.out_bias:
            n += D
        if self.qk_norm == "head":
            n += 2 * Hd
        elif self.qk_norm == "full":
            n += N * Hd + Nk * Hd
        return n

    def _ffn_parameters(self, is_moe: bool, active: bool) -> int:
        D = self.d_model
        if not is_moe:
            return 3 * D * self.d_ff
        F = self.expert_ffn_hidden_size
        routed = (self.top_k if active else self.num_experts) * 3 * D * F
        shared = 0
        if self.num_shared_experts > 0:
            shared = 3 * D * (self.shared_expert_ffn_size or self.num_shared_experts * F)
            shared += D if self.shared_expert_gate else 0
        return self.num_experts * D + routed + shared

    def _count(self, active: bool) -> int:
        moe = set(self.moe_indices())
        n = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2) + self.d_model
        for i in range(self.n_layers):
            n += 2 * self.d_model + self._attention_parameters() + self._ffn_parameters(i in moe, active)
        return n

    def total_parameters(self) -> int:
        """Parameters of the built model (all experts, global count)."""
        return self._count(active=False)

    def active_parameters_per_token(self) -> int:
        """Parameters one token's computation touches (``top_k`` routed experts per MoE layer)."""
        return self._count(active=True)


__all__ = ["DecoderConfig"]
