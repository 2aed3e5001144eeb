"""What every family adapter shares: config translation helpers and the map between our tensors and Hugging Face's.

Legend: E experts (L of them local to a rank), H hidden, F expert FFN width.

Our :class:`~lightning_moe.models.MoEDecoder` names its tensors as the Hugging Face checkpoints
do (``layers.3.self_attn.q_proj.weight`` is ``model.layers.3.self_attn.q_proj.weight``), so most
tensors map one to one. The MoE layers differ, and differ between families and between the two
expert layouts:

- per-expert (every checkpoint before transformers 5, and what ``save_pretrained`` still writes
  by default): ``{moe}.experts.{e}.{gate,up,down}_proj.weight`` (Mixtral: ``w1, w3, w2``),
  ``[F, H]`` / ``[H, F]`` each;
- fused (transformers 5 in memory, ``save_original_format=False``): ``{moe}.experts.gate_up_proj``
  ``[E, 2F, H]`` (gate rows first) and ``{moe}.experts.down_proj`` ``[E, H, F]``;
- ours: ``mlp.experts.w1``/``w3`` ``[E, H, F]`` and ``w2`` ``[E, F, H]`` (transposed: a grouped
  GEMM multiplies rows by ``w[e]``), dense FFNs ``mlp.w1``/``w3``/``w2`` (HF:
  ``mlp.gate_proj``/``up_proj``/``down_proj``), the router ``mlp.router.weight`` ``[E, H]`` (HF: ``gate.weight``)
  and its correction bias ``mlp.router.expert_bias`` (HF: ``gate.e_score_correction_bias``), shared
  experts ``mlp.shared_experts.w*`` ``[1, ...]`` (HF: a dense MLP).

A family adapter (one small file each: ``mixtral.py``, ``qwen3_moe.py``, ...) says how its
``config.json`` maps to a :class:`~lightning_moe.models.DecoderConfig` and the few names that
differ. :meth:`FamilyAdapter.plan` turns a model into :class:`TensorMap` entries, each of which
lists the HF tensors it needs (so that a missing, unexpected or mis-shaped tensor is named before
anything is read), reads a rank's local slice, and writes the HF tensors back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_moe.models.decoder_config import DecoderConfig

LAYOUTS = ("per_expert", "fused")
_DENSE_NAMES = ("gate_proj", "up_proj", "down_proj")  # a dense (shared-expert) MLP, in w1, w3, w2 order
_META_KEYS = frozenset({"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path"})


class ConfigReader:
    """A ``config.json`` dict that records which keys were read, so that the rest is carried through unchanged.

    Args:
        config: the parsed ``config.json``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """``config[key]`` or ``default``, marking ``key`` as read."""
        self.used.add(key)
        return self.config.get(key, default)

    def first(self, keys: tuple[str, ...], default: Any = None) -> Any:
        """The value of the first of ``keys`` present (old and new spellings), marking all as read."""
        self.used.update(keys)
        for key in keys:
            if key in self.config:
                return self.config[key]
        return default

    def require(self, key: str) -> Any:
        """``config[key]``; raises a ``ValueError`` naming the key when it is missing."""
        self.used.add(key)
        if key not in self.config:
            raise ValueError(f"config.json has no {key!r}, which this model family needs; is it a complete config?")
        return self.config[key]

    def extra(self) -> dict[str, Any]:
        """The keys not read (and not rewritten on save): carried through to the saved ``config.json``."""
        return {k: v for k, v in self.config.items() if k not in self.used and k not in _META_KEYS}


def rope_from_hf(reader: ConfigReader) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either spelling: transformers 5's ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    params = reader.get("rope_parameters")
    scaling = reader.get("rope_scaling")
    theta = reader.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(10000.0 if theta is None else theta), scaling


def rope_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` (the spelling every transformers version reads)."""
    return {"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling}


def common_from_hf(reader: ConfigReader) -> dict[str, Any]:
    """The :class:`DecoderConfig` fields every family spells the same way."""
    theta, scaling = rope_from_hf(reader)
    if reader.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act={reader.config['hidden_act']!r} is not supported; the experts are SwiGLU (silu)")
    sliding = reader.get("sliding_window")
    if reader.get("use_sliding_window", sliding is not None and sliding != 0) and sliding:
        raise ValueError(
            f"sliding-window attention (sliding_window={sliding}) is not supported; lightning_moe's decoder attends "
            "to the whole sequence"
        )
    if reader.get("quantization_config") is not None:
        raise ValueError(
            "quantized checkpoints (quantization_config in config.json, e.g. DeepSeek-V3's FP8 release) are not "
            "supported; load a bfloat16 copy (dequantize it first)"
        )
    reader.get("layer_types")
    reader.get("max_window_layers")
    return {
        "vocab_size": reader.require("vocab_size"),
        "d_model": reader.require("hidden_size"),
        "n_layers": reader.require("num_hidden_layers"),
        "n_heads": reader.require("num_attention_heads"),
        "n_kv_heads": reader.get("num_key_value_heads"),
        "rms_norm_eps": float(reader.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_positions": reader.get("max_position_embeddings", 4096),
        "tie_embeddings": bool(reader.get("tie_word_embeddings", False)),
        "bos_token_id": reader.get("bos_token_id"),
        "eos_token_id": reader.get("eos_token_id"),
        "pad_token_id": reader.get("pad_token_id"),
    }


def head_dim_from_hf(reader: ConfigReader) -> int | None:
    """``head_dim`` when it is not ``hidden_size // num_attention_heads`` (``None`` when it is, or is unset)."""
    head_dim = reader.get("head_dim")
    default = reader.require("hidden_size") // reader.require("num_attention_heads")
    return None if head_dim in (None, default) else int(head_dim)


def common_to_hf(config: DecoderConfig, architecture: str, model_type: str) -> dict[str, Any]:
    """The ``config.json`` fields every family spells the same way (the family adds its own)."""
    out = dict(config.extra)
    out.update(
        {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_positions,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            **rope_to_hf(config),
        }
    )
    return out


def require_features(config: DecoderConfig, family: str, **expected: Any) -> None:
    """Raise if ``config`` uses a feature that ``family``'s checkpoints cannot express.

    Args:
        config: the model's configuration.
        family: the family being written.
        **expected: attribute (or property) of ``config`` to the value the family needs;
            ``all_layers_moe=True`` checks that every layer is an MoE layer.

    Raises:
        ValueError: naming every attribute that differs, with both values.
    """
    bad = []
    for name, want in expected.items():
        have = (
            config.moe_indices() == list(range(config.n_layers)) if name == "all_layers_moe" else getattr(config, name)
        )
        if have != want:
            bad.append(f"{name}={have!r} (needs {want!r})")
    if bad:
        raise ValueError(
            f"this model cannot be saved as {family}: {', '.join(bad)}; save it as a family that has these features"
        )


def moe_layer_indices(
    n_layers: int, num_experts: int, mlp_only_layers: list[int], sparse_step: int
) -> list[int] | None:
    """Qwen's rule for which layers are MoE; ``None`` when that is every layer."""
    if num_experts == 0:
        return []
    layers = [i for i in range(n_layers) if i not in set(mlp_only_layers) and (i + 1) % sparse_step == 0]
    return None if len(layers) == n_layers else layers


# --- the tensor map ---------------------------------------------------------------------------------


@dataclass
class TensorMap:
    """Some of our tensors and the HF tensors they are made of.

    Attributes:
        ours: our state-dict keys (a fused ``gate_up_proj`` makes two: ``w1`` and ``w3``).
        hf: HF tensor name to its expected shape.
        kind: ``"copy"`` (same tensor), ``"t"`` (transpose), ``"t1"`` (transpose into ``[1, ...]``),
            ``"experts"`` (one ``[out, in]`` tensor per expert), ``"gate_up"``, ``"down"`` (fused).
        expert_offset: first global expert of this rank's slice (expert kinds).
    """

    ours: tuple[str, ...]
    hf: dict[str, tuple[int, ...]]
    kind: str
    expert_offset: int = 0
    num_local: int = 0

    @property
    def is_expert(self) -> bool:
        """Whether this entry holds routed experts (sliced per rank under expert parallelism)."""
        return self.kind in ("experts", "gate_up", "down")

    def load(self, files: Any, targets: dict[str, Tensor]) -> None:
        """Copy this entry's tensors from ``files`` into ``targets`` (our local tensors, by key)."""
        names = list(self.hf)
        lo, hi = self.expert_offset, self.expert_offset + self.num_local
        if self.kind == "copy":
            targets[self.ours[0]].copy_(files.read(names[0]))
        elif self.kind == "t":
            targets[self.ours[0]].copy_(files.read(names[0]).t())
        elif self.kind == "t1":
            targets[self.ours[0]].copy_(files.read(names[0]).t()[None])
        elif self.kind == "experts":
            target = targets[self.ours[0]]
            for e in range(lo, hi):
                target[e - lo].copy_(files.read(names[e]).t())
        elif self.kind == "gate_up":
            gate_up = files.read(names[0], rows=(lo, hi))  # [L, 2F, H]
            F = gate_up.shape[1] // 2
            targets[self.ours[0]].copy_(gate_up[:, :F].transpose(1, 2))
            targets[self.ours[1]].copy_(gate_up[:, F:].transpose(1, 2))
        elif self.kind == "down":
            targets[self.ours[0]].copy_(files.read(names[0], rows=(lo, hi)).transpose(1, 2))
        else:  # pragma: no cover - kinds are fixed above
            raise AssertionError(self.kind)

    def save(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The HF tensors of this entry, from our full (all experts) tensors in ``state``."""
        names = list(self.hf)
        if self.kind == "copy":
            return {names[0]: state[self.ours[0]]}
        if self.kind == "t":
            return {names[0]: state[self.ours[0]].t()}
        if self.kind == "t1":
            return {names[0]: state[self.ours[0]][0].t()}
        if self.kind == "experts":
            w = state[self.ours[0]]
            return {name: w[e].t() for e, name in enumerate(names)}
        if self.kind == "gate_up":
            w1, w3 = state[self.ours[0]], state[self.ours[1]]
            return {names[0]: torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1)}
        if self.kind == "down":
            return {names[0]: state[self.ours[0]].transpose(1, 2)}
        raise AssertionError(self.kind)  # pragma: no cover


class FamilyAdapter:
    """How one model family's Hugging Face checkpoints map to :class:`~lightning_moe.models.MoEDecoder`.

    Subclasses set the names that differ and implement :meth:`config_from_hf` / :meth:`config_to_hf`.

    Attributes:
        model_types: the ``model_type`` values of ``config.json`` this adapter reads.
        architecture: the ``architectures`` entry written on save.
        moe_prefix: the sparse block's module name in a layer (``mlp``).
        per_expert_moe_prefix: the same in per-expert checkpoints, if it differs (Mixtral:
            ``block_sparse_moe``).
        expert_names: the per-expert projection names, in our ``w1, w3, w2`` order.
        shared_prefix: the shared experts' module name inside the sparse block.
        ignored: regexes of checkpoint tensors that are not weights of this architecture (e.g.
            rotary caches of old exports); they are skipped, everything else must be used.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    architecture: ClassVar[str] = ""
    moe_prefix: ClassVar[str] = "mlp"
    per_expert_moe_prefix: ClassVar[str | None] = None
    expert_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: ClassVar[str] = "shared_experts"
    ignored: ClassVar[tuple[str, ...]] = (r".*\.rotary_emb\.inv_freq",)

    def config_from_hf(self, config: dict[str, Any]) -> DecoderConfig:  # pragma: no cover - abstract
        """The :class:`DecoderConfig` of a ``config.json`` of this family."""
        raise NotImplementedError

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        """The ``config.json`` of a :class:`DecoderConfig` of this family."""
        raise NotImplementedError

    def ignored_patterns(self, config: DecoderConfig) -> list[str]:
        """Regexes of checkpoint tensors to skip for this config (``ignored`` by default)."""
        return list(self.ignored)

    def is_ignored(self, name: str, config: DecoderConfig) -> bool:
        """Whether checkpoint tensor ``name`` is skipped (matches an :meth:`ignored_patterns` regex)."""
        return any(re.fullmatch(p, name) for p in self.ignored_patterns(config))

    def detect_layout(self, names: set[str], config: DecoderConfig) -> str:
        """``"fused"`` if the checkpoint's first MoE layer has a fused ``gate_up_proj``, else ``"per_expert"``."""
        moe = config.moe_indices()
        if moe and f"model.layers.{moe[0]}.{self.moe_prefix}.experts.gate_up_proj" in names:
            return "fused"
        return "per_expert"

    def plan(
        self, config: DecoderConfig, layout: str, shapes: dict[str, tuple[int, ...]], local: dict[str, tuple[int, int]]
    ) -> list[TensorMap]:
        """The tensor map of a model.

        Args:
            config: the model's configuration.
            layout: ``"per_expert"`` or ``"fused"``.
            shapes: our state-dict key to its *global* shape (all experts).
            local: for every MoE layer prefix (``layers.3.mlp``), its ``(expert_offset, num_local_experts)``.

        Returns:
            Entries covering every key of ``shapes`` exactly once.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not supported; choose one of {LAYOUTS}")
        entries: list[TensorMap] = []
        done: set[str] = set()
        for key, shape in shapes.items():
            if key in done:
                continue
            match = re.fullmatch(r"layers\.(\d+)\.mlp\.(.+)", key)
            if match and f"layers.{match.group(1)}.mlp" in local:
                layer, rest = int(match.group(1)), match.group(2)
                entry = self._moe_entry(config, layout, layer, rest, shapes, local[f"layers.{layer}.mlp"])
            elif dense := re.fullmatch(r"layers\.(\d+)\.mlp\.(w[123])\.weight", key):
                proj = _DENSE_NAMES[{"w1": 0, "w3": 1, "w2": 2}[dense.group(2)]]
                entry = TensorMap((key,), {f"model.layers.{dense.group(1)}.mlp.{proj}.weight": shape}, "copy")
            elif key == "lm_head.weight":
                entry = TensorMap((key,), {key: shape}, "copy")
            else:
                entry = TensorMap((key,), {f"model.{key}": shape}, "copy")
            entries.append(entry)
            done.update(entry.ours)
        return entries

    def _moe_entry(
        self,
        config: DecoderConfig,
        layout: str,
        layer: int,
        rest: str,
        shapes: dict[str, tuple[int, ...]],
        local: tuple[int, int],
    ) -> TensorMap:
        ours = f"layers.{layer}.mlp.{rest}"
        prefix = self.moe_prefix
        if layout == "per_expert" and self.per_expert_moe_prefix is not None:
            prefix = self.per_expert_moe_prefix
        hf = f"model.layers.{layer}.{prefix}"
        shape = shapes[ours]
        offset, num_local = local
        if rest == "router.weight":
            return TensorMap((ours,), {f"{hf}.gate.weight": shape}, "copy")
        if rest == "router.expert_bias":
            return TensorMap((ours,), {f"{hf}.gate.e_score_correction_bias": shape}, "copy")
        if rest == "shared_expert_gate.weight":
            return TensorMap((ours,), {f"{hf}.shared_expert_gate.weight": shape}, "copy")
        which = {"w1": 0, "w3": 1, "w2": 2}
        match = re.fullmatch(r"(experts|shared_experts)\.(w[123])", rest)
        if match is None:
            raise ValueError(f"no Hugging Face name for our tensor {ours!r} in the {self.model_types[0]} adapter")
        module, w = match.groups()
        if module == "shared_experts":
            _, a, b = shape  # [1, H, F] or [1, F, H]
            name = f"{hf}.{self.shared_prefix}.{_DENSE_NAMES[which[w]]}.weight"
            return TensorMap((ours,), {name: (b, a)}, "t1")
        E, a, b = shape
        if layout == "fused":
            if w == "w2":
                return TensorMap((ours,), {f"{hf}.experts.down_proj": (E, b, a)}, "down", offset, num_local)
            w1, w3 = f"layers.{layer}.mlp.experts.w1", f"layers.{layer}.mlp.experts.w3"
            return TensorMap((w1, w3), {f"{hf}.experts.gate_up_proj": (E, 2 * b, a)}, "gate_up", offset, num_local)
        proj = self.expert_names[which[w]]
        names = {f"{hf}.experts.{e}.{proj}.weight": (b, a) for e in range(E)}
        return TensorMap((ours,), names, "experts", offset, num_local)


__all__ = [
    "LAYOUTS",
    "ConfigReader",
    "FamilyAdapter",
    "TensorMap",
    "common_from_hf",
    "common_to_hf",
    "moe_layer_indices",
    "rope_from_hf",
    "rope_to_hf",
]
