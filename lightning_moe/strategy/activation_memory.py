"""Bytes of activations one rank keeps for the backward pass of our transformers, from the config.

Legend: t tokens on this rank (batch x sequence), s source tokens (encoder-decoder), D model width,
F FFN width, E experts, K top-k, N kept (token, choice) rows, R rows a rank receives under expert
parallelism, V vocabulary, c bytes of a compute-dtype element.

The model is a ledger: every tensor that autograd saves in one forward of a block (or that a
checkpoint keeps alive), with its size, as our code computes it. Storage shared between saved
tensors is counted once (e.g. ``out_proj`` saves the SDPA output that SDPA saved itself), and
parameters are not activations. The ledger was derived from, and is tested against, the tensors
``torch.autograd.graph.saved_tensors_hooks`` sees in a forward of a real model
(tests/test_memory.py). What depends on the device is written for CUDA: dropout keeps a 1-byte
mask per element, attention is a fused SDPA kernel (flash or memory-efficient) that saves q, k, v,
its output and a float32 logsumexp per head and query, never the ``[T, S]`` probabilities.

Precision (the strategy's, with FSDP2 gathering parameters in the compute dtype):

- ``32-true``: everything float32; a LayerNorm output is saved once however many Linears read it.
- ``bf16-mixed``, as the strategy runs it: FSDP2 gathers bfloat16 parameters and casts the floating
  inputs of every unit (a block, an MoE layer's experts) to bfloat16, under ``torch.autocast``.
  So every block starts from a bfloat16 residual stream, even after an MoE layer whose output is
  float32, and a decoder block gets its own bfloat16 copy of the encoder memory. LayerNorm runs in
  float32 (it saves a float32 input and makes a float32 output) and every Linear that reads a
  float32 tensor casts it again (autocast caches casts of parameters only), so q, k and v
  projections keep three bfloat16 copies of the normalised input. Routers stay in float32. This
  precision is measured on the GPU only (benchmarks/memory_check.py): CPU autocast differs.
- ``bf16-true``: everything bfloat16 except the router's float32 logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import Tensor, nn

from lightning_moe.models.config import GPTConfig, TransformerConfig

PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "bf16-true")
MOE_BACKENDS: tuple[str, ...] = ("torch", "triton")
ACTIVATION_CHECKPOINTING: tuple[str | None, ...] = (None, "full", "experts")
_INT64, _INT32, _FP32, _BOOL = 8, 4, 4, 1


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of what a block saves under one precision."""

    compute: int  # matmul inputs and outputs, attention, expert rows
    norm_in: int  # the input a LayerNorm saves
    norm_out: int  # a LayerNorm's output
    autocast: bool  # each Linear reading a float32 tensor saves its own cast copy; FSDP2 casts unit inputs

    @classmethod
    def of(cls, precision: str) -> _Dtypes:
        if precision == "32-true":
            return cls(compute=4, norm_in=4, norm_out=4, autocast=False)
        if precision == "bf16-mixed":
            return cls(compute=2, norm_in=4, norm_out=4, autocast=True)
        if precision == "bf16-true":
            return cls(compute=2, norm_in=2, norm_out=2, autocast=False)
        raise ValueError(f"precision={precision!r} is not supported; choose one of {PRECISIONS}")


@dataclass
class _Ledger:
    """Named byte counts, in the order they were added."""

    items: list[tuple[str, int]] = field(default_factory=list)

    def add(self, label: str, nbytes: float) -> None:
        if nbytes:
            self.items.append((label, int(nbytes)))

    @property
    def total(self) -> int:
        return sum(n for _, n in self.items)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one rank in one training step.

    Attributes:
        saved: bytes autograd (and activation checkpointing) keeps from the end of the forward to
            the backward: the sum of ``parts``.
        parts: ``(part, bytes)`` of ``saved``: ``"embeddings"``, each kind of block (summed over
            its layers), ``"head and loss"``.
        transient: the largest short-lived extra on top of ``saved``: the logits and their
            float32 copy at the loss, the loss gradient ``[t, V]`` at the start of the backward,
            or one block's gradients (and, with activation checkpointing, its recomputed
            activations) during the backward. Not counted: the generator states a checkpoint
            keeps to replay dropout (about 5 KB per checkpointed call).
        block_saved: bytes one block of each kind saves without checkpointing (its ledger).
    """

    saved: int
    parts: tuple[tuple[str, int], ...]
    transient: int
    block_saved: tuple[tuple[str, int], ...]

    @property
    def peak(self) -> int:
        """``saved + transient``: the activation bytes at their peak."""
        return self.saved + self.transient


@dataclass(frozen=True)
class _Shape:
    """What every block ledger needs to know."""

    D: int
    n_heads: int
    d_ff: int
    F: int  # expert FFN width
    F_shared: int  # width of the shared-expert FFN (0: none)
    E: int
    K: int
    activation: str
    dropout: float
    capacity_factor: float | None
    min_capacity: int
    ep: int  # expert-parallel size
    backend: str
    checkpointing: str | None
    dt: _Dtypes

    def ffn_hidden_factor(self) -> int:
        """``[t, F]`` tensors an FFN of our torch code saves: SwiGLU g, silu(g), u, h; GELU g, h; ReLU h."""
        return {"swiglu": 4, "gelu": 2, "relu": 1}[self.activation]

    def kept_rows(self, t: int) -> int:
        """N: dropless every (token, choice) pair; with capacity at most ``E x capacity`` of them."""
        pairs = t * self.K
        if self.capacity_factor is None:
            return pairs
        capacity = max(self.min_capacity, -(-pairs * self.capacity_factor // self.E))
        return int(min(pairs, self.E * capacity))


def _norm(led: _Ledger, label: str, t: int, s: _Shape) -> None:
    led.add(f"{label} input", s.dt.norm_in * s.D * t)
    led.add(f"{label} mean and rstd", 2 * _FP32 * t)


def _normed_for_linears(led: _Ledger, label: str, t: int, s: _Shape, linears: int) -> None:
    """The normalised input of ``linears`` Linear layers: one tensor, or one autocast copy per Linear."""
    if s.dt.autocast:
        led.add(f"{label} ({linears} autocast copies)", linears * s.dt.compute * s.D * t)
    else:
        led.add(label, s.dt.norm_out * s.D * t)


def _dropout(led: _Ledger, label: str, t: int, s: _Shape) -> None:
    if s.dropout > 0:
        led.add(f"{label} dropout mask", _BOOL * s.D * t)


def _attention(
    led: _Ledger,
    prefix: str,
    t: int,
    s: _Shape,
    kv_tokens: int | None = None,
    shared_memory: bool = False,
    masked: bool = False,
) -> None:
    """Self-attention (``kv_tokens=None``) or cross-attention over ``kv_tokens`` memory positions.

    ``masked``: a key padding mask ``[B, 1, 1, S]`` that SDPA turns into a bias of the query dtype and saves.
    """
    c = s.dt.compute
    _norm(led, f"{prefix} norm", t, s)
    if kv_tokens is None:
        _normed_for_linears(led, f"{prefix} q/k/v input", t, s, 3)
        kv = t
    else:
        _normed_for_linears(led, f"{prefix} q input", t, s, 1)
        kv = kv_tokens
        if s.dt.autocast:  # FSDP2 handed the block a bfloat16 copy of the memory (k and v read it)
            led.add(f"{prefix} k/v input (the block's bfloat16 copy of the memory)", c * s.D * kv)
        elif not shared_memory:
            led.add(f"{prefix} k/v input (the memory)", s.dt.norm_out * s.D * kv)
    led.add(f"{prefix} q and SDPA output", 2 * c * s.D * t)
    led.add(f"{prefix} k, v", 2 * c * s.D * kv)
    led.add(f"{prefix} SDPA logsumexp", _FP32 * s.n_heads * t)
    if masked:
        led.add(f"{prefix} key padding mask (as a bias)", s.dt.compute * kv)
    _dropout(led, prefix, t, s)


def _dense_ffn(led: _Ledger, prefix: str, t: int, s: _Shape) -> None:
    _norm(led, f"{prefix} norm", t, s)
    _normed_for_linears(led, f"{prefix} input", t, s, 2 if s.activation == "swiglu" else 1)
    led.add(f"{prefix} hidden", s.ffn_hidden_factor() * s.dt.compute * s.d_ff * t)
    _dropout(led, prefix, t, s)


def _moe(led: _Ledger, prefix: str, t: int, s: _Shape, masked: bool = False) -> None:
    """An MoE FFN: norm, router, dispatch, experts, combine, shared experts (see the module docstring).

    ``masked``: a padding mask is passed (translation); shared experts multiply by it.
    """
    c, D, E, K = s.dt.compute, s.D, s.E, s.K
    N = s.kept_rows(t)
    R = N  # rows a rank receives under expert parallelism, for a balanced load
    P = t * K
    # Three views of the normalised tokens, which may be one tensor: the LayerNorm output, its
    # float32 version (the torch router's input) and its compute-dtype version (the experts' input).
    x_f32 = "ln_out" if s.dt.norm_out == _FP32 else "x_f32"
    x_compute = "ln_out" if s.dt.compute == s.dt.norm_out else "x_compute"
    saved: set[str] = set()

    def save(tensor: str, label: str, nbytes: int) -> None:
        if tensor not in saved:
            saved.add(tensor)
            led.add(label, nbytes)

    _norm(led, f"{prefix} norm", t, s)
    if s.backend == "torch":
        save(x_f32, f"{prefix} router input (float32)", _FP32 * D * t)
        # probs and logits (softmax, logsumexp), top-k indices, kept mask, a float32 column of the
        # aux loss and the logsumexp; for K > 1 the top-k renormalisation's weights and sums.
        per_token = 2 * _FP32 * E + (_INT64 + _BOOL) * K + 2 * _FP32
        if K > 1:
            per_token += _FP32 * K + 2 * _FP32
        led.add(f"{prefix} router probs, logits, top-k", per_token * t)
        led.add(f"{prefix} router per-expert sums", _FP32 * E + _FP32)
    else:
        save("ln_out", f"{prefix} router input (LayerNorm output)", s.dt.norm_out * D * t)
        # probs, logsumexp, top-k indices (int64) and probabilities, kept mask, combine weights
        led.add(f"{prefix} router probs, top-k", (_FP32 * E + _FP32 + (_INT64 + 2 * _FP32 + _BOOL) * K) * t)
        led.add(f"{prefix} router counts", _FP32 * E)
    if s.dt.norm_out != _FP32:  # bf16-true: the router computes with a float32 copy of its bfloat16 gate
        led.add(f"{prefix} router float32 gate weight", _FP32 * E * D)
    # With activation_checkpointing="experts" the expert FFN keeps only its inputs (which the
    # checkpoint saves) and recomputes its hidden activations in the backward.
    recompute = s.checkpointing == "experts"
    if s.backend == "triton" and s.ep == 1:
        # Fused gather/experts/scatter: token rows, row order and counts, g/u/h of every slot, slots.
        save(x_compute, f"{prefix} expert input (compute dtype)", c * D * t)
        # row order, and the expert counts: a view of the router's int32 workspace (slot ranks, the
        # per-block histograms and their offsets, counts), which the view keeps alive
        if not recompute:  # recomputed: the fused kernel's saved row order is dropped with the rest
            blocks = _router_blocks(t)
            led.add(f"{prefix} row order and router workspace", _INT32 * P + _INT32 * (P + 2 * blocks * K * E + E))
            hidden = 3 if s.activation == "swiglu" else 2
            led.add(f"{prefix} expert hidden g/u/h (all T*K slots)", hidden * c * s.F * P)
            led.add(f"{prefix} expert output slots", c * D * P)
    else:
        led.add(f"{prefix} dispatch indices", 2 * _INT64 * N)
        if s.ep > 1:
            led.add(f"{prefix} regroup index", _INT64 * R)
        led.add(f"{prefix} expert input rows", c * D * R)
        if recompute:
            led.add(f"{prefix} expert row counts (checkpoint input)", _INT64 * (E // s.ep))
        elif s.backend == "torch":
            led.add(f"{prefix} expert hidden", s.ffn_hidden_factor() * c * s.F * R)
        else:  # triton grouped FFN on received rows
            hidden = 3 if s.activation == "swiglu" else 2
            led.add(f"{prefix} expert hidden g/u/h", hidden * c * s.F * R)
        # the rows and their weights (in the rows' dtype) of the weighted sum, and its slot copy
        led.add(f"{prefix} combine rows, weights, slots", 2 * c * D * N + c * N)
    if s.F_shared:
        save(x_compute, f"{prefix} shared-expert input (compute dtype)", c * D * t)
        led.add(f"{prefix} shared-expert hidden", s.ffn_hidden_factor() * c * s.F_shared * t)
        if masked:
            led.add(f"{prefix} shared-expert padding mask", c * t)
    _dropout(led, prefix, t, s)


def _router_blocks(t: int) -> int:
    """Token blocks of the fused router's gate kernel (``kernels.router._gate_block``)."""
    block = 32
    while -(-t // block) > 4096:
        block *= 2
    return -(-t // block)


def _block(kind: str, t: int, s: _Shape, memory_tokens: int | None = None) -> _Ledger:
    """The ledger of one block: ``kind`` is ``"<stack>/<dense|moe>"``, stack ``gpt``, ``encoder``, ``decoder``."""
    led = _Ledger()
    stack, ffn = kind.split("/")
    # The translation module passes padding masks: the encoder's self-attention and the
    # cross-attention mask padding keys; causal self-attention never sees a later (padding) key.
    _attention(led, "self-attention", t, s, masked=stack == "encoder")
    if stack == "decoder":
        _attention(led, "cross-attention", t, s, kv_tokens=memory_tokens, shared_memory=True, masked=True)
    if ffn == "moe":
        _moe(led, "MoE", t, s, masked=stack != "gpt")
    else:
        _dense_ffn(led, "FFN", t, s)
    return led


def _head(led: _Ledger, t: int, V: int, s: _Shape, label_smoothing: bool) -> None:
    """Final norm, tied output projection and the float32 cross-entropy of ``t`` tokens."""
    _norm(led, "final norm", t, s)
    _normed_for_linears(led, "output projection input", t, s, 1)
    led.add("log-probabilities (float32)", _FP32 * V * t)
    led.add("labels", _INT64 * t)
    if label_smoothing:  # the padding mask the label-smoothed loss selects with, and its int64 count
        led.add("loss mask and token count", _BOOL * t + _INT64)
    else:  # cross-entropy's float32 count of the counted tokens
        led.add("loss token count", _FP32)


def _shape(
    config: GPTConfig | TransformerConfig,
    precision: str,
    backend: str,
    checkpointing: str | None,
    expert_parallel_size: int,
) -> _Shape:
    return _Shape(
        D=config.d_model,
        n_heads=config.n_heads,
        d_ff=config.d_ff,
        F=config.expert_ffn_hidden_size,
        F_shared=config.expert_ffn_hidden_size * config.num_shared_experts,
        E=max(config.num_experts, 1),
        K=config.top_k,
        activation=config.activation,
        dropout=config.dropout,
        capacity_factor=config.capacity_factor,
        min_capacity=config.min_capacity,
        ep=expert_parallel_size,
        backend=backend,
        checkpointing=checkpointing,
        dt=_Dtypes.of(precision),
    )


def estimate_activations(
    config: GPTConfig | TransformerConfig,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "bf16-mixed",
    moe_backend: str = "triton",
    activation_checkpointing: str | None = None,
    expert_parallel_size: int = 1,
    source_len: int | None = None,
) -> ActivationEstimate:
    """Activation bytes of one training step on one rank.

    Args:
        config: the model.
        batch_size: sequences per rank.
        seq_len: tokens per sequence (the target side of the encoder-decoder).
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"bf16-true"``.
        moe_backend: ``"torch"`` (reference path) or ``"triton"`` (fused kernels, the CUDA default).
        activation_checkpointing: ``None``, ``"full"`` (each block keeps only its input) or
            ``"experts"`` (the expert FFNs of the torch path recompute their hidden activations).
        expert_parallel_size: P; tokens each rank receives are assumed balanced (``R = N``).
        source_len: encoder tokens per sequence (encoder-decoder; default ``seq_len``).

    Returns:
        The :class:`ActivationEstimate`.

    Raises:
        ValueError: on an unknown precision, backend or checkpointing mode.
    """
    if moe_backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend={moe_backend!r} is not supported; choose one of {MOE_BACKENDS}")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing={activation_checkpointing!r} is not supported; choose None, 'full' or 'experts'"
        )
    s = _shape(config, precision, moe_backend, activation_checkpointing, expert_parallel_size)
    t = batch_size * seq_len
    V = config.vocab_size
    full = activation_checkpointing == "full"
    if isinstance(config, GPTConfig):
        moe_layers = set(config.moe_indices())
        stacks: Sequence[tuple[str, int, list[bool]]] = [("gpt", t, [i in moe_layers for i in range(config.n_layers)])]
        memory_tokens = None
    else:
        src = batch_size * (source_len if source_len is not None else seq_len)
        enc, dec = set(config.encoder_moe_indices()), set(config.decoder_moe_indices())
        stacks = [
            ("encoder", src, [i in enc for i in range(config.n_encoder_layers)]),
            ("decoder", t, [i in dec for i in range(config.n_decoder_layers)]),
        ]
        memory_tokens = src

    parts = _Ledger()
    embeddings = _Ledger()
    for stack, tokens, _ in stacks:
        embeddings.add(f"{stack} token ids", _INT64 * tokens)
        _dropout(embeddings, f"{stack} embeddings", tokens, s)
    parts.add("embeddings", embeddings.total)

    block_saved: dict[str, int] = {}
    for stack, tokens, is_moe in stacks:
        for moe in is_moe:
            kind = f"{stack}/{'moe' if moe else 'dense'}"
            if kind not in block_saved:
                block_saved[kind] = _block(kind, tokens, s, memory_tokens).total
            if full:  # the checkpoint saves the block's input
                # (float32 for 32-true, else bfloat16: bf16-mixed's FSDP2 casts block inputs)
                kept = s.dt.compute * s.D * tokens
                parts.add(f"{kind} blocks (checkpointed inputs)", kept)
            else:
                parts.add(f"{kind} blocks", block_saved[kind])
    if memory_tokens is not None:
        encoder = _Ledger()
        _norm(encoder, "encoder final norm", memory_tokens, s)
        # One memory tensor read by every decoder block's cross-attention, or kept (with "full"
        # checkpointing) by every decoder block's recomputation; under bf16-mixed each decoder
        # block holds its own bfloat16 copy (counted in the block, or here with "full").
        if not s.dt.autocast:
            encoder.add("encoder output (cross-attention memory)", s.dt.norm_out * s.D * memory_tokens)
        elif full:
            n_decoder = len(stacks[-1][2])
            encoder.add(
                "bfloat16 memory copies (decoder checkpoint inputs)", n_decoder * s.dt.compute * s.D * memory_tokens
            )
        parts.add("encoder output", encoder.total)
        if full:  # the source and target padding masks, inputs of every checkpointed block
            parts.add("padding masks (checkpoint inputs)", _BOOL * (memory_tokens + t))
    head = _Ledger()
    _head(head, t, V, s, label_smoothing=isinstance(config, TransformerConfig))
    parts.add("head and loss", head.total)
    merged: dict[str, int] = {}
    for label, nbytes in parts.items:
        merged[label] = merged.get(label, 0) + nbytes

    c = s.dt.compute
    logits = c * V * t + (_FP32 * V * t if c != _FP32 else 0)  # logits and their float32 copy
    loss_grad = 2 * _FP32 * V * t  # d(log-probs) and d(logits) in float32
    largest_block = max(block_saved.values(), default=0)
    block_backward = largest_block * (2 if full else 1)  # gradients (+ the recomputed block)
    if activation_checkpointing == "experts":  # the recomputed expert hidden activations
        if s.backend == "torch":
            block_backward += s.ffn_hidden_factor() * c * s.F * s.kept_rows(t)
        else:
            block_backward += (3 if s.activation == "swiglu" else 2) * c * s.F * t * s.K + c * s.D * t * s.K
    transient = max(logits, loss_grad, block_backward)
    return ActivationEstimate(
        saved=parts.total,
        parts=tuple(merged.items()),
        transient=transient,
        block_saved=tuple(block_saved.items()),
    )


def block_ledger(
    config: GPTConfig | TransformerConfig,
    kind: str,
    tokens: int,
    *,
    precision: str = "bf16-mixed",
    moe_backend: str = "triton",
    activation_checkpointing: str | None = None,
    expert_parallel_size: int = 1,
    memory_tokens: int | None = None,
) -> list[tuple[str, int]]:
    """Every saved tensor of one block, for reading and debugging: ``(what, bytes)``.

    Args:
        config: the model.
        kind: ``"gpt/dense"``, ``"gpt/moe"``, ``"encoder/..."`` or ``"decoder/..."``.
        tokens: t, tokens through the block.
        precision: as for :func:`estimate_activations`.
        moe_backend: as for :func:`estimate_activations`.
        activation_checkpointing: as for :func:`estimate_activations` (``"full"`` lists what
            the block's recomputation saves).
        expert_parallel_size: P.
        memory_tokens: encoder positions a decoder block attends to.

    Returns:
        The ledger entries.
    """
    s = _shape(config, precision, moe_backend, activation_checkpointing, expert_parallel_size)
    return list(_block(kind, tokens, s, memory_tokens).items)


class SavedTensorBytes:
    """Measures the bytes autograd saves for the backward inside a ``with`` block.

    Counts each storage once (views and repeated saves share it), leaving out the parameters and
    buffers of ``modules`` (FSDP2's gathered parameters included: they are looked up again whenever
    a new storage is saved). An exact, independent measure of what a forward keeps for its
    backward; activation checkpointing's kept inputs are not saved tensors and are not seen.

    Args:
        modules: modules whose parameters and buffers are not activations.

    Example:
        >>> model = torch.nn.Linear(4, 4)
        >>> with SavedTensorBytes([model]) as saved:
        ...     y = model(torch.randn(2, 4, requires_grad=True)).relu()
        >>> saved.nbytes  # the Linear's input and the ReLU's output, float32
        64
    """

    def __init__(self, modules: Iterable[nn.Module] = ()) -> None:
        self.modules = list(modules)
        self.nbytes = 0
        self.storages: dict[int, tuple[tuple[int, ...], torch.dtype, int]] = {}
        self._state_ptrs: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _refresh_state(self) -> None:
        tensors = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        self._state_ptrs = {_storage_ptr(t) for t in tensors}

    def _pack(self, tensor: Tensor) -> Tensor:
        if tensor.is_meta:
            return tensor
        ptr = _storage_ptr(tensor)
        if ptr in self.storages or ptr == 0:
            return tensor
        # Look the parameters up again: FSDP2 frees gathered parameters after a unit's forward and the
        # allocator may hand their memory to an activation, so an old address proves nothing.
        self._refresh_state()
        if ptr not in self._state_ptrs:
            nbytes = tensor.untyped_storage().nbytes()
            self.storages[ptr] = (tuple(tensor.shape), tensor.dtype, nbytes)
            self.nbytes += nbytes
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._refresh_state()
        self._hooks.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


def _storage_ptr(tensor: Tensor) -> int:
    if isinstance(tensor, torch.distributed.tensor.DTensor):
        tensor = tensor.to_local()
    return tensor.untyped_storage().data_ptr()


__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "PRECISIONS",
    "ActivationEstimate",
    "SavedTensorBytes",
    "block_ledger",
    "estimate_activations",
]
