"""Per-GPU memory of a training step under :class:`~lightning_moe.ExpertParallelStrategy`, from the config.

Legend: W world size, N data-parallel ranks (W, no tensor parallelism), P expert-parallel size,
D = N / P expert-data-parallel size, E experts of a MoE layer, L = E / P experts per rank.

:func:`estimate_memory` is a pure function of the model config and the layout. It follows the
strategy's placement table and FSDP2's mechanics:

- **parameters, gradients, optimizer state** (per rank): non-expert tensors (embeddings, attention,
  norms, dense FFNs, shared experts, routers) sharded over the N data-parallel ranks with
  ``data_parallel="fsdp"``, whole with ``"ddp"``; expert tensors ``[E, ...]`` split over P and then
  sharded over D (``"fsdp"``). FSDP2 pads the sharded dim to a multiple of the shards. Master
  weights and gradients are float32 (``32-true``, ``bf16-mixed``) or bfloat16 (``bf16-true``);
  AdamW keeps two moments of the same dtype. With ``cpu_offload=True`` all three live in host
  memory, parameters and gradients pinned (PyTorch's pinned allocator rounds every block up to a
  power of two).
- **gathered units**: FSDP2 all-gathers each unit (a transformer block with its router, the block's
  routed experts; the root: embeddings, positions, final norms) into unsharded copies in the
  compute dtype (the router computes in float32 from the gathered copy). With ``"fsdp"`` a unit is resharded after its forward and gathered again for its
  backward: about two blocks are unsharded at a time (the current one and the prefetched next),
  plus, in the backward, the current block's unsharded gradients and the float32 buffer they are
  reduced through, and the root's unsharded weight and gradient (the tied embedding's gradient
  accumulates from the first to the last backward op). With ``"ddp"`` (FSDP2 with a shard group of
  one) every unit stays unsharded from the forward to its backward.
- **activations**: the saved-for-backward ledger of :mod:`lightning_moe.strategy.activation_memory`,
  plus its largest transient (logits at the loss, the loss gradient, a block's backward).
- **optimizer step**: the foreach AdamW of one GPU allocates one temporary the size of the
  parameters of its largest group (``sqrt`` of the second moment).

The peak is the largest of three moments: the backward (states, activations, gathered units), the
end of the backward (states, gradients, the root's buffers) and the optimizer step (states,
gradients, the step's temporary). Step 1 peaks lower (its optimizer state is created in the step).
Not counted: the CUDA context and NCCL buffers (outside ``torch.cuda.memory_allocated``), allocator
fragmentation (the gap between allocated and reserved memory), torch.compile workspaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_moe.models.config import GPTConfig, TransformerConfig
from lightning_moe.strategy.activation_memory import (
    ACTIVATION_CHECKPOINTING,
    PRECISIONS,
    ActivationEstimate,
    estimate_activations,
)
from lightning_moe.strategy.mesh import fsdp_shard_dim

DATA_PARALLEL_MODES: tuple[str, ...] = ("fsdp", "ddp")
OPTIMIZERS: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 0}  # optimizer state tensors per parameter
GiB = 1024**3


@dataclass(frozen=True)
class ParameterTensor:
    """One parameter of the model as the config defines it.

    Attributes:
        name: its name in ``model.named_parameters()``.
        shape: its global shape.
        kind: ``"expert"`` (routed experts, ``[E, ...]``), ``"router"`` or ``"dense"`` (the rest).
        unit: the FSDP unit that gathers it: ``"root"``, a block (``"blocks.3"``, routers
            included), or a block's routed experts (``"blocks.3.ffn.experts"``).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    unit: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def parameter_tensors(config: GPTConfig | TransformerConfig) -> list[ParameterTensor]:
    """Every parameter of :class:`~lightning_moe.models.GPT` or the encoder-decoder, in ``named_parameters`` order.

    Args:
        config: the model config.

    Returns:
        The parameters with their shapes, kinds and FSDP units.
    """
    D, V = config.d_model, config.vocab_size
    out = [ParameterTensor("embed.weight", (V, D), "dense", "root")]
    learned = config.positions == "learned"

    def norm(prefix: str, unit: str) -> None:
        out.append(ParameterTensor(f"{prefix}.weight", (D,), "dense", unit))
        out.append(ParameterTensor(f"{prefix}.bias", (D,), "dense", unit))

    def attention(prefix: str, unit: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append(ParameterTensor(f"{prefix}.{proj}.weight", (D, D), "dense", unit))
            out.append(ParameterTensor(f"{prefix}.{proj}.bias", (D,), "dense", unit))

    def ffn(prefix: str, unit: str, width: int, stacked: int | None, kind: str) -> None:
        # Dense FFN: Linear weights [out, in]; experts: stacked [E, H, F] / [E, F, H].
        names = ("w1", "w2", "w3") if config.activation == "swiglu" else ("w1", "w2")
        for name in names:
            if stacked is None:
                shape: tuple[int, ...] = (D, width) if name == "w2" else (width, D)
                out.append(ParameterTensor(f"{prefix}.{name}.weight", shape, kind, unit))
            else:
                shape = (stacked, width, D) if name == "w2" else (stacked, D, width)
                out.append(ParameterTensor(f"{prefix}.{name}", shape, kind, unit))

    def block(prefix: str, is_moe: bool, cross: bool) -> None:
        norm(f"{prefix}.norm_attn", prefix)
        attention(f"{prefix}.attn", prefix)
        if cross:
            norm(f"{prefix}.norm_cross", prefix)
            attention(f"{prefix}.cross_attn", prefix)
        norm(f"{prefix}.norm_ffn", prefix)
        if not is_moe:
            ffn(f"{prefix}.ffn", prefix, config.d_ff, None, "dense")
            return
        F = config.expert_ffn_hidden_size
        out.append(ParameterTensor(f"{prefix}.ffn.router.weight", (config.num_experts, D), "router", prefix))
        ffn(f"{prefix}.ffn.experts", f"{prefix}.ffn.experts", F, config.num_experts, "expert")
        if config.num_shared_experts:
            ffn(f"{prefix}.ffn.shared_experts", prefix, F * config.num_shared_experts, 1, "dense")

    if isinstance(config, GPTConfig):
        if learned:
            out.append(ParameterTensor("positions.weight", (config.max_positions, D), "dense", "root"))
        moe = set(config.moe_indices())
        for i in range(config.n_layers):
            block(f"blocks.{i}", i in moe, cross=False)
        norm("norm", "root")
        return out
    if learned:
        out.append(ParameterTensor("encoder_positions.weight", (config.max_positions, D), "dense", "root"))
        out.append(ParameterTensor("decoder_positions.weight", (config.max_positions, D), "dense", "root"))
    enc, dec = set(config.encoder_moe_indices()), set(config.decoder_moe_indices())
    for i in range(config.n_encoder_layers):
        block(f"encoder.{i}", i in enc, cross=False)
    norm("encoder_norm", "root")
    for i in range(config.n_decoder_layers):
        block(f"decoder.{i}", i in dec, cross=True)
    norm("decoder_norm", "root")
    return out


def shard_numel(shape: tuple[int, ...], shards: int) -> int:
    """Elements of one rank's FSDP2 shard of a tensor, padding included.

    FSDP2 splits dim 0 into ``shards`` chunks of ``ceil(size / shards)`` rows, padding the last
    ones; the strategy splits another dim instead when dim 0 has fewer rows than shards and one
    divides evenly (:func:`~lightning_moe.strategy.mesh.fsdp_shard_dim`).
    """
    if shards == 1 or not shape:
        return math.prod(shape)
    dim = fsdp_shard_dim(shape, shards)
    return -(-shape[dim] // shards) * math.prod(shape) // shape[dim]


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory of one training step on one GPU, in bytes (``table()`` prints it).

    Attributes:
        parameters: master weights on the GPU (0 with CPU offload).
        gradients: sharded gradients on the GPU after the backward (0 with CPU offload).
        optimizer_states: optimizer state on the GPU (0 with CPU offload).
        gathered_units: FSDP2's unsharded parameter copies (and, in the backward, the unsharded
            gradients and reduce buffers) at their peak.
        gathered_after_forward: unsharded copies still held when the forward ends (``"ddp"``:
            every unit; ``"fsdp"``: none, each unit is resharded after its forward).
        activations: activations at their peak (``activations_saved`` plus a transient).
        activations_saved: tensors kept for the backward at the end of the forward.
        optimizer_step: the optimizer step's temporary on the GPU.
        total: the peak: the largest of ``phases``.
        phases: ``{"backward": ..., "end of backward": ..., "optimizer step": ...}``.
        host_parameters: host bytes of offloaded parameters (pinned, rounded up to powers of two).
        host_gradients: host bytes of offloaded gradients (pinned).
        host_optimizer_states: host bytes of the offloaded optimizer state.
        host_total: host bytes of the training state at the optimizer step (0 without offload).
        parameters_count: parameters of the model (all experts).
        local_parameters_count: parameters this rank stores (its shards, padding included).
        activation_parts: ``(part, bytes)`` of ``activations_saved``.
        layout: a one-line description of what was estimated.
    """

    parameters: int
    gradients: int
    optimizer_states: int
    gathered_units: int
    gathered_after_forward: int
    activations: int
    activations_saved: int
    optimizer_step: int
    total: int
    phases: dict[str, int]
    host_parameters: int
    host_gradients: int
    host_optimizer_states: int
    host_total: int
    parameters_count: int
    local_parameters_count: int
    activation_parts: tuple[tuple[str, int], ...]
    layout: str

    @property
    def peak_phase(self) -> str:
        """The moment of the step that peaks."""
        return max(self.phases, key=lambda k: self.phases[k])

    def table(self, unit: str = "auto") -> str:
        """The estimate as a text table (``unit``: ``"GiB"``, ``"MiB"``, ``"B"`` or ``"auto"``: GiB from 1 GiB up)."""
        if unit == "auto":
            unit = "GiB" if max(self.total, self.host_total) >= GiB else "MiB"
        if unit not in ("GiB", "MiB", "B"):
            raise ValueError(f"unit={unit!r} is not supported; choose 'GiB', 'MiB', 'B' or 'auto'")
        div = {"GiB": GiB, "MiB": 1024**2, "B": 1}[unit]

        def fmt(n: int) -> str:
            return f"{n / div:,.2f} {unit}" if unit != "B" else f"{n:,} B"

        offload = self.host_total > 0
        rows = [
            ("parameters", self.parameters, self.host_parameters),
            ("gradients", self.gradients, self.host_gradients),
            ("optimizer state", self.optimizer_states, self.host_optimizer_states),
            ("optimizer step temporary", self.optimizer_step, None),
            ("gathered FSDP units (peak)", self.gathered_units, None),
            ("activations saved for backward", self.activations_saved, None),
            ("activations (peak)", self.activations, None),
        ]
        width = max(len(r[0]) for r in rows) + 2
        lines = [
            self.layout,
            f"parameters: {self.parameters_count:,} in the model, {self.local_parameters_count:,} stored per rank",
            "",
            f"{'per GPU':<{width}}{'GPU':>14}" + (f"{'host':>14}" if offload else ""),
        ]
        for name, gpu, host in rows:
            line = f"{name:<{width}}{fmt(gpu):>14}"
            if offload:
                line += f"{fmt(host) if host is not None else '':>14}"
            lines.append(line)
        lines.append("")
        for name, value in self.phases.items():
            lines.append(f"{'at ' + name:<{width}}{fmt(value):>14}")
        lines.append(f"{'peak (' + self.peak_phase + ')':<{width}}{fmt(self.total):>14}")
        if offload:
            lines.append(f"{'host memory (training state)':<{width}}{'':>14}{fmt(self.host_total):>14}")
        lines.append("")
        lines.append("activations saved, by part:")
        for name, value in self.activation_parts:
            lines.append(f"  {name:<{width - 2}}{fmt(value):>14}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _resolve_backend(config: GPTConfig | TransformerConfig, moe_backend: str | None) -> str:
    backend = moe_backend or config.moe_backend
    return "triton" if backend == "auto" else backend


def _validate(
    config: GPTConfig | TransformerConfig,
    world_size: int,
    expert_parallel_size: int,
    data_parallel: str,
    tensor_parallel_size: int,
    precision: str,
    optimizer: str,
    activation_checkpointing: str | None,
    batch_size: int,
    seq_len: int,
) -> None:
    for name, value in (
        ("world_size", world_size),
        ("expert_parallel_size", expert_parallel_size),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if tensor_parallel_size != 1:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} is not modelled by the estimator yet (the strategy "
            "supports it); estimate with tensor_parallel_size=1 and divide attention and dense FFN state by it"
        )
    if data_parallel not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel={data_parallel!r} is not supported; choose 'fsdp' or 'ddp'")
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not supported by ExpertParallelStrategy; choose one of {PRECISIONS}"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not modelled; choose one of {tuple(OPTIMIZERS)}")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing={activation_checkpointing!r} is not supported; choose None, 'full' or 'experts'"
        )
    if world_size % expert_parallel_size != 0:
        raise ValueError(
            f"the {world_size} data-parallel ranks are not divisible by expert_parallel_size={expert_parallel_size}; "
            f"choose an expert_parallel_size that divides {world_size}"
        )
    if config.num_experts and config.num_experts % expert_parallel_size != 0:
        raise ValueError(
            f"num_experts={config.num_experts} is not divisible by expert_parallel_size={expert_parallel_size}; "
            f"choose an expert_parallel_size that divides {config.num_experts}"
        )


def estimate_memory(
    model_config: GPTConfig | TransformerConfig,
    *,
    batch_size: int,
    seq_len: int,
    world_size: int,
    expert_parallel_size: int = 1,
    data_parallel: str = "fsdp",
    tensor_parallel_size: int = 1,
    cpu_offload: bool = False,
    activation_checkpointing: str | None = None,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    moe_backend: str | None = None,
    source_len: int | None = None,
    pin_memory: bool = True,
) -> MemoryEstimate:
    """Estimate the per-GPU (and host) memory of training ``model_config`` with ExpertParallelStrategy.

    Args:
        model_config: a :class:`~lightning_moe.models.GPTConfig` or
            :class:`~lightning_moe.models.TransformerConfig` (``vocab_size`` set).
        batch_size: sequences per GPU per step (the DataLoader batch size).
        seq_len: tokens per sequence (the target length for the encoder-decoder).
        world_size: W, GPUs.
        expert_parallel_size: P, GPUs that split each MoE layer's experts.
        data_parallel: ``"fsdp"`` (ZeRO-3) or ``"ddp"`` (replicated non-expert state).
        tensor_parallel_size: must be 1 (tensor parallelism is not modelled yet).
        cpu_offload: parameters, gradients and optimizer state in host memory.
        activation_checkpointing: ``None``, ``"full"`` or ``"experts"``.
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"bf16-true"``.
        optimizer: ``"adamw"``/``"adam"`` (two moments) or ``"sgd"`` (no state).
        moe_backend: ``"torch"`` or ``"triton"``; ``None`` takes the config's (``"auto"`` is Triton,
            what a GPU runs).
        source_len: encoder tokens per sequence of the encoder-decoder (default ``seq_len``).
        pin_memory: offloaded parameters and gradients are pinned (FSDP2's default on CUDA).

    Returns:
        The :class:`MemoryEstimate`.

    Raises:
        ValueError: naming the setting that does not fit and what to choose instead.
    """
    config = model_config
    if getattr(config, "vocab_size", None) is None:
        raise ValueError("model_config.vocab_size is None; set it (a recipe's data.vocab_size) to estimate memory")
    _validate(
        config, world_size, expert_parallel_size, data_parallel, tensor_parallel_size, precision, optimizer,
        activation_checkpointing, batch_size, seq_len,
    )  # fmt: skip
    N, P = world_size, expert_parallel_size
    D = N // P
    fsdp = data_parallel == "fsdp"
    state = 2 if precision == "bf16-true" else 4  # master weights, sharded gradients, Adam moments
    gathered = 4 if precision == "32-true" else 2  # unsharded copies in the compute dtype
    reduce = state  # the dtype gradients are reduced in

    tensors = parameter_tensors(config)
    local_numel: dict[str, int] = {}
    unit_numel: dict[str, int] = {}  # unsharded elements of every unit on this rank
    unit_bytes: dict[str, int] = {}
    for p in tensors:
        shape = p.shape
        shards = (D if fsdp else 1) if p.kind == "expert" else (N if fsdp else 1)
        if p.kind == "expert":
            shape = (shape[0] // P, *shape[1:])
        local_numel[p.name] = shard_numel(shape, shards)
        unit_numel[p.unit] = unit_numel.get(p.unit, 0) + math.prod(shape)
        unit_bytes[p.unit] = unit_bytes.get(p.unit, 0) + gathered * math.prod(shape)

    local = sum(local_numel.values())
    params = state * local
    grads = state * local
    moments = OPTIMIZERS[optimizer] * state * local
    matrices = sum(local_numel[p.name] for p in tensors if len(p.shape) >= 2)
    vectors = local - matrices
    step_temp = state * max(matrices, vectors) if OPTIMIZERS[optimizer] else 0

    # FSDP units: the root, and per block the block (router included) and its experts (a "group").
    groups: dict[str, int] = {}
    group_numel: dict[str, int] = {}
    for unit, nbytes in unit_bytes.items():
        if unit == "root":
            continue
        block = ".".join(unit.split(".")[:2])
        groups[block] = groups.get(block, 0) + nbytes
        group_numel[block] = group_numel.get(block, 0) + unit_numel[unit]
    largest_group = max(groups.values(), default=0)
    largest_group_numel = max(group_numel.values(), default=0)
    root = unit_bytes.get("root", 0)
    root_numel = unit_numel.get("root", 0)
    in_flight_groups = 2 if N == 1 else 3  # current + prefetched next (+ the flat all-gather output)
    if cpu_offload:  # the sharded copy moved to the GPU and cast before the gather
        offload_copy = (state + gathered) * (largest_group_numel // max(N, 1))
    else:
        offload_copy = 0
    # Gradients of the block in its backward: unsharded (compute dtype), then the reduce buffer.
    grad_buffers = largest_group_numel * (gathered + reduce)
    root_buffers = root + gathered * root_numel  # the root's unsharded weight and its gradient
    if fsdp:
        units_backward = root_buffers + in_flight_groups * largest_group + offload_copy + grad_buffers
    else:
        units_backward = sum(unit_bytes.values()) + gathered * root_numel + grad_buffers
    units_end = root_buffers + reduce * root_numel

    acts: ActivationEstimate = estimate_activations(
        config,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        moe_backend=_resolve_backend(config, moe_backend),
        activation_checkpointing=activation_checkpointing,
        expert_parallel_size=P,
        source_len=source_len,
    )

    host_params = host_grads = host_moments = host_total = 0
    if cpu_offload:
        local_tensor_bytes = [state * n for n in local_numel.values()]
        pinned = _next_pow2 if pin_memory else (lambda n: n)
        host_params = sum(pinned(n) for n in local_tensor_bytes)
        host_grads = host_params
        host_moments = moments
        host_total = host_params + host_grads + host_moments + 2 * max(local_tensor_bytes, default=0)
        gpu_states, gpu_grads, gpu_moments, gpu_step = 0, 0, 0, 0
    else:
        gpu_states, gpu_grads, gpu_moments, gpu_step = params, grads, moments, step_temp

    phases = {
        "backward": gpu_states + gpu_moments + acts.peak + units_backward,
        "end of backward": gpu_states + gpu_moments + gpu_grads + units_end,
        "optimizer step": gpu_states + gpu_moments + gpu_grads + gpu_step,
    }
    layout = (
        f"{type(config).__name__}, {world_size} GPU(s): data_parallel={data_parallel!r} over N={N} ranks "
        f"(expert_parallel_size P={P} x expert-data-parallel D={D}), cpu_offload={cpu_offload}, "
        f"activation_checkpointing={activation_checkpointing!r}, precision={precision!r}, "
        f"moe_backend={_resolve_backend(config, moe_backend)!r}, batch {batch_size} x {seq_len} tokens per GPU"
    )
    return MemoryEstimate(
        parameters=gpu_states,
        gradients=gpu_grads,
        optimizer_states=gpu_moments,
        gathered_units=max(units_backward, units_end),
        gathered_after_forward=0 if fsdp else sum(unit_bytes.values()),
        activations=acts.peak,
        activations_saved=acts.saved,
        optimizer_step=gpu_step,
        total=max(phases.values()),
        phases=phases,
        host_parameters=host_params,
        host_gradients=host_grads,
        host_optimizer_states=host_moments,
        host_total=host_total,
        parameters_count=sum(p.numel for p in tensors),
        local_parameters_count=local,
        activation_parts=acts.parts,
        layout=layout,
    )


__all__ = [
    "DATA_PARALLEL_MODES",
    "OPTIMIZERS",
    "MemoryEstimate",
    "ParameterTensor",
    "estimate_memory",
    "parameter_tensors",
    "shard_numel",
]
