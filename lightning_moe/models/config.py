"""Self-validating configurations of the encoder-decoder and decoder-only MoE transformers.

Both configs share the width, attention and MoE settings (:class:`_ModelConfig`); they differ in
their layer counts and defaults. ``num_experts=0`` or ``moe_every=0`` (with no explicit layer
lists) gives a dense model. Parameter counts are computed arithmetically from the config and are
tested against the parameters of the built model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_moe.moe.router import validate_router_options

POSITIONS = ("sinusoidal", "learned")
ACTIVATIONS = ("swiglu", "gelu", "relu")
MOE_BACKENDS = ("auto", "torch", "triton")


@dataclass(kw_only=True)
class _ModelConfig:
    """Fields and arithmetic shared by :class:`TransformerConfig` and :class:`GPTConfig`."""

    # --- size ---------------------------------------------------------------------------------
    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    max_positions: int = 1024
    positions: str = "sinusoidal"
    activation: str = "gelu"  # FFN activation of dense layers and experts alike

    # --- MoE ------------------------------------------------------------------------------------
    moe_every: int = 2  # layers i with (i + 1) % moe_every == 0 are MoE: every other layer, the 2nd first
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = 1.25  # None: dropless
    eval_capacity_factor: float | None = None  # None: dropless evaluation and decoding
    min_capacity: int = 4
    random_token_selection: bool = True
    router_jitter: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    moe_backend: str = "auto"
    expert_ffn_size: int | None = None  # None: d_ff
    num_shared_experts: int = 0
    # router options (lightning_moe.moe.Router); the defaults are GShard/DeepSpeed routing
    score_function: str = "softmax"  # "softmax" | "sigmoid"
    normalize_top_k: bool | None = None  # None: renormalise for top_k >= 2 only
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1  # group-limited top-k: experts in this many groups
    top_groups: int | None = None  # groups a token may choose from (None: all)
    expert_bias: bool = False  # per-expert correction bias, used for selection only
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (ExpertBiasUpdate callback)

    def _validate_common(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose n_heads that divides "
                f"{self.d_model} (e.g. {_largest_divisor_at_most(self.d_model, self.n_heads)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); 0.1 is typical, 0 turns dropout off")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is not supported; choose one of {POSITIONS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported; choose one of {ACTIVATIONS}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every={self.moe_every} must be >= 0; 0 makes every layer dense, 2 every other")
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0; 0 makes the model dense")
        if self.expert_ffn_size is not None and self.expert_ffn_size < 1:
            raise ValueError(f"expert_ffn_size={self.expert_ffn_size} must be positive, or None to use d_ff")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0 (0 turns them off)")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r} is not supported; choose one of {MOE_BACKENDS}")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}; choose top_k <= "
                f"{self.num_experts} or add experts"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be positive (1.0-2.0 is typical), or None for dropless")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity} must be >= 0")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1); 0 turns jitter off")
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError(
                f"aux_loss_weight={self.aux_loss_weight} and z_loss_weight={self.z_loss_weight} must be >= 0; "
                "use 0 to turn a loss off"
            )
        if self.num_experts > 0:
            validate_router_options(
                self.num_experts, self.top_k, self.score_function, self.routed_scaling_factor, self.expert_groups,
                self.top_groups, self.expert_bias, self.bias_update_rate,
            )  # fmt: skip

    def _moe_indices(self, n_layers: int, explicit: list[int] | None, field: str) -> list[int]:
        """Which of ``n_layers`` layers are MoE, from an explicit list or from ``moe_every``."""
        if explicit is not None:
            bad = [i for i in explicit if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"{field}={explicit} holds layer indices {bad} outside [0, {n_layers}); use indices of the "
                    f"{n_layers} layers"
                )
            if len(set(explicit)) != len(explicit):
                raise ValueError(f"{field}={explicit} repeats a layer index; list each MoE layer once")
            if explicit and self.num_experts == 0:
                raise ValueError(
                    f"{field}={explicit} asks for MoE layers but num_experts=0; set num_experts >= 1 or pass "
                    f"{field}=[] for a dense model"
                )
            return sorted(explicit)
        if self.num_experts == 0 or self.moe_every == 0:
            return []
        return [i for i in range(n_layers) if (i + 1) % self.moe_every == 0]

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Hidden width of each expert (``expert_ffn_size``, or ``d_ff`` when that is None)."""
        return self.d_ff if self.expert_ffn_size is None else self.expert_ffn_size

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
            "activation": self.activation,
            "backend": self.moe_backend,
            "num_shared_experts": self.num_shared_experts,
            "score_function": self.score_function,
            "normalize_top_k": self.normalize_top_k,
            "routed_scaling_factor": self.routed_scaling_factor,
            "expert_groups": self.expert_groups,
            "top_groups": self.top_groups,
            "expert_bias": self.expert_bias,
            "bias_update_rate": self.bias_update_rate,
        }

    # --- parameter arithmetic ---------------------------------------------------------------------
    def _ffn_parameters(self, ffn_size: int) -> int:
        """A bias-free FFN: SwiGLU has three ``D x F`` matrices, GELU/ReLU two."""
        return (3 if self.activation == "swiglu" else 2) * self.d_model * ffn_size

    def _attention_parameters(self) -> int:
        """Q, K, V and output projections, each ``D x D`` with a bias."""
        return 4 * (self.d_model * self.d_model + self.d_model)

    def _norm_parameters(self) -> int:
        return 2 * self.d_model

    def _moe_parameters(self, active: bool) -> int:
        """One MoE layer: bias-free router, ``E`` experts (``top_k`` of them if ``active``), shared experts."""
        expert = self._ffn_parameters(self.expert_ffn_hidden_size)
        n_routed = self.top_k if active else self.num_experts
        shared = self._ffn_parameters(self.expert_ffn_hidden_size * self.num_shared_experts)
        return self.num_experts * self.d_model + n_routed * expert + shared

    def _ffn_or_moe_parameters(self, is_moe: bool, active: bool) -> int:
        return self._moe_parameters(active) if is_moe else self._ffn_parameters(self.d_ff)

    def _position_parameters(self) -> int:
        return self.max_positions * self.d_model if self.positions == "learned" else 0


@dataclass(kw_only=True)
class TransformerConfig(_ModelConfig):
    """Configuration of :class:`~lightning_moe.models.EncoderDecoderTransformer`.

    Pre-LN encoder-decoder with a source/target embedding shared with the output projection.
    By default every other FFN (layers 1, 3, 5, ... of encoder and decoder) is an MoE layer; pass
    ``moe_encoder_layers``/``moe_decoder_layers`` to choose the layers explicitly.

    Args:
        vocab_size: V, shared source/target vocabulary.
        d_model: D, model width.
        n_heads: attention heads; must divide ``d_model``.
        d_ff: hidden width of the dense FFNs.
        n_encoder_layers: encoder blocks.
        n_decoder_layers: decoder blocks.
        dropout: dropout on embeddings, attention probabilities and residual branches.
        max_positions: longest source or target sequence.
        positions: ``"sinusoidal"`` (fixed, no parameters) or ``"learned"`` (one table per stack).
        activation: FFN activation (dense and expert FFNs): ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        moe_every: layer ``i`` is MoE when ``(i + 1) % moe_every == 0``; 0 makes every layer dense.
        moe_encoder_layers: explicit encoder MoE layer indices (overrides ``moe_every``).
        moe_decoder_layers: explicit decoder MoE layer indices (overrides ``moe_every``).
        num_experts: experts per MoE layer; 0 makes the model dense.
        top_k: experts per token.
        capacity_factor: training capacity factor; ``None`` is dropless.
        eval_capacity_factor: eval (validation, decoding) capacity factor; ``None`` is dropless.
        min_capacity: lower bound on slots per expert.
        random_token_selection: Random Token Selection (Kim et al. 2021) in training.
        router_jitter: multiplicative router input jitter epsilon, training only.
        aux_loss_weight: weight of each layer's load-balancing loss.
        z_loss_weight: weight of each layer's router z-loss.
        moe_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        expert_ffn_size: hidden width of each expert; ``None`` uses ``d_ff``.
        num_shared_experts: shared experts every token passes through (0 = off).
        score_function: router scores, ``"softmax"`` or ``"sigmoid"``.
        normalize_top_k: renormalise the kept router weights; ``None``: only for ``top_k >= 2``.
        routed_scaling_factor: constant factor on the routed experts' combine weights.
        expert_groups: expert groups of group-limited top-k (1 = off).
        top_groups: groups a token may choose its experts from (``None`` = all).
        expert_bias: per-expert correction bias for expert selection (aux-loss-free balancing).
        bias_update_rate: step of the bias update after each optimizer step (add the
            :class:`~lightning_moe.callbacks.ExpertBiasUpdate` callback); 0 keeps it fixed.

    Raises:
        ValueError: on an inconsistent setting, naming the value and the fix.
    """

    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    moe_encoder_layers: list[int] | None = None
    moe_decoder_layers: list[int] | None = None

    def __post_init__(self) -> None:
        self._validate_common()
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.encoder_moe_indices()
        self.decoder_moe_indices()

    def encoder_moe_indices(self) -> list[int]:
        """Indices of the encoder layers whose FFN is an MoE layer."""
        return self._moe_indices(self.n_encoder_layers, self.moe_encoder_layers, "moe_encoder_layers")

    def decoder_moe_indices(self) -> list[int]:
        """Indices of the decoder layers whose FFN is an MoE layer."""
        return self._moe_indices(self.n_decoder_layers, self.moe_decoder_layers, "moe_decoder_layers")

    def _count(self, active: bool) -> int:
        enc_moe, dec_moe = set(self.encoder_moe_indices()), set(self.decoder_moe_indices())
        n = self.vocab_size * self.d_model + 2 * self._position_parameters()
        for i in range(self.n_encoder_layers):
            n += 2 * self._norm_parameters() + self._attention_parameters()
            n += self._ffn_or_moe_parameters(i in enc_moe, active)
        for i in range(self.n_decoder_layers):
            n += 3 * self._norm_parameters() + 2 * self._attention_parameters()
            n += self._ffn_or_moe_parameters(i in dec_moe, active)
        return n + 2 * self._norm_parameters()  # final encoder and decoder norms

    def total_parameters(self) -> int:
        """Number of parameters of the built model (all experts, global count)."""
        return self._count(active=False)

    def active_parameters_per_token(self) -> int:
        """Parameters one token's computation touches: all but the ``E - top_k`` unchosen experts per MoE layer.

        Embedding and output projection are counted once (they are tied).
        """
        return self._count(active=True)


@dataclass(kw_only=True)
class GPTConfig(_ModelConfig):
    """Configuration of :class:`~lightning_moe.models.GPT`, a decoder-only MoE language model.

    Same fields as :class:`TransformerConfig` except the layer counts: ``n_layers`` blocks and
    optional explicit ``moe_layers``. Defaults follow GPT-2 small with learned positions.

    Args:
        vocab_size: V.
        d_model: D, model width.
        n_heads: attention heads; must divide ``d_model``.
        d_ff: hidden width of the dense FFNs.
        n_layers: decoder blocks.
        moe_layers: explicit MoE layer indices (overrides ``moe_every``).
        dropout: dropout on embeddings, attention probabilities and residual branches.
        max_positions: longest sequence.
        positions: ``"learned"`` or ``"sinusoidal"``.
        activation: FFN activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        moe_every: layer ``i`` is MoE when ``(i + 1) % moe_every == 0``; 0 makes every layer dense.
        num_experts: experts per MoE layer; 0 makes the model dense.
        top_k: experts per token.
        capacity_factor: training capacity factor; ``None`` is dropless.
        eval_capacity_factor: eval (validation, decoding) capacity factor; ``None`` is dropless.
        min_capacity: lower bound on slots per expert.
        random_token_selection: Random Token Selection in training.
        router_jitter: multiplicative router input jitter epsilon, training only.
        aux_loss_weight: weight of each layer's load-balancing loss.
        z_loss_weight: weight of each layer's router z-loss.
        moe_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        expert_ffn_size: hidden width of each expert; ``None`` uses ``d_ff``.
        num_shared_experts: shared experts every token passes through (0 = off).
        score_function: router scores, ``"softmax"`` or ``"sigmoid"``.
        normalize_top_k: renormalise the kept router weights; ``None``: only for ``top_k >= 2``.
        routed_scaling_factor: constant factor on the routed experts' combine weights.
        expert_groups: expert groups of group-limited top-k (1 = off).
        top_groups: groups a token may choose its experts from (``None`` = all).
        expert_bias: per-expert correction bias for expert selection (aux-loss-free balancing).
        bias_update_rate: step of the bias update after each optimizer step (add the
            :class:`~lightning_moe.callbacks.ExpertBiasUpdate` callback); 0 keeps it fixed.

    Raises:
        ValueError: on an inconsistent setting, naming the value and the fix.
    """

    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    n_layers: int = 12
    moe_layers: list[int] | None = None
    positions: str = "learned"

    def __post_init__(self) -> None:
        self._validate_common()
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"n_layers={self.n_layers!r} must be a positive integer")
        self.moe_indices()

    def moe_indices(self) -> list[int]:
        """Indices of the layers whose FFN is an MoE layer."""
        return self._moe_indices(self.n_layers, self.moe_layers, "moe_layers")

    def _count(self, active: bool) -> int:
        moe = set(self.moe_indices())
        n = self.vocab_size * self.d_model + self._position_parameters()
        for i in range(self.n_layers):
            n += 2 * self._norm_parameters() + self._attention_parameters()
            n += self._ffn_or_moe_parameters(i in moe, active)
        return n + self._norm_parameters()

    def total_parameters(self) -> int:
        """Number of parameters of the built model (all experts, global count)."""
        return self._count(active=False)

    def active_parameters_per_token(self) -> int:
        """Parameters one token's computation touches: all but the ``E - top_k`` unchosen experts per MoE layer."""
        return self._count(active=True)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


__all__ = ["GPTConfig", "TransformerConfig"]
