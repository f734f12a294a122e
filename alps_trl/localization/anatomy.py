"""Model anatomy: where every layer's q/k/v/o projections live and how their rows split into heads.

Layer 1 (docs/architecture.md). Everything above (weight streaming, scoring, restriction) asks an
`AttentionLayout` for tensor names and row slices instead of knowing architectures itself.

Torch layout: a Linear weight is [out_features, in_features]. Query head h owns rows
[h*hd, (h+1)*hd) of q_proj; kv group g owns rows [g*hd, (g+1)*hd) of k_proj and v_proj; query head
h belongs to kv group h // (H // KV). A fused qkv_proj stacks [q (H*hd) | k (KV*hd) | v (KV*hd)].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: reading a checkpoint's layout must not need it
    import torch


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one family of HF causal LMs names its attention projections.

    `layer_prefix` is formatted with the layer index. With `fused_qkv` set, q/k/v are row blocks of
    that one projection and `q`, `k`, `v` are unused.
    """

    layer_prefix: str = "model.layers.{layer}.self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused_qkv: str | None = None
    note: str = ""


# One table: adding an architecture is one entry (keyed by `config.model_type`).
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(),
    "mistral": ArchitectureSpec(),
    "qwen2": ArchitectureSpec(note="q/k/v biases"),
    "qwen3": ArchitectureSpec(note="per-head_dim q/k RMSNorm shared by all heads (trains as non-attention)"),
    "gemma": ArchitectureSpec(note="explicit head_dim"),
    "gemma2": ArchitectureSpec(note="explicit head_dim"),
    "phi3": ArchitectureSpec(fused_qkv="qkv_proj", note="fused qkv_proj"),
}


# Plausibility bounds of a config's counts: far above any real model, low enough that a corrupt value is refused
# before it drives a loop or an allocation.
MAX_LAYERS = 10_000
MAX_HEADS = 65_536
MAX_HIDDEN = 1 << 24


def _count(cfg: dict, key: str, value: Any, limit: int) -> int:
    """`value` (a config field) as a positive int no larger than `limit`, or a ValueError naming `key`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise ValueError(f"The config's {key}={str(value)[:50]} is not a positive integer (at most {limit}).")
    return value


def head_counts(cfg: dict) -> tuple[int, int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, hidden_size, head_dim) of a config dict, checked.

    Every count must be a positive integer within the MAX_* bounds, num_key_value_heads must divide
    num_attention_heads, and without an explicit head_dim num_attention_heads must divide hidden_size.
    Raises ValueError saying which field is wrong.
    """
    num_layers = _count(cfg, "num_hidden_layers", cfg.get("num_hidden_layers"), MAX_LAYERS)
    num_heads = _count(cfg, "num_attention_heads", cfg.get("num_attention_heads"), MAX_HEADS)
    kv_value = cfg.get("num_key_value_heads")
    num_kv = num_heads if kv_value is None else _count(cfg, "num_key_value_heads", kv_value, MAX_HEADS)
    hidden = _count(cfg, "hidden_size", cfg.get("hidden_size"), MAX_HIDDEN)
    if not cfg.get("head_dim"):  # absent, null or 0: derived, as transformers does
        if hidden % num_heads:
            raise ValueError(
                f"The config's hidden_size={hidden} is not a multiple of num_attention_heads={num_heads} (and it "
                "gives no head_dim)."
            )
        head_dim = hidden // num_heads
    else:
        head_dim = _count(cfg, "head_dim", cfg.get("head_dim"), MAX_HIDDEN)
    if num_heads % num_kv:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv}.")
    return num_layers, num_heads, num_kv, hidden, head_dim


class UnsupportedArchitectureError(ValueError):
    """Raised for a model_type that has no entry in `ARCHITECTURES`."""


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_spec(model_type: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported by ALPS. Supported model_type values: "
            f"{', '.join(supported_architectures())}. Add an entry to alps_trl.localization.anatomy.ARCHITECTURES "
            "if your model names its attention projections like one of these."
        ) from None


@dataclass(frozen=True)
class RowBlock:
    """A block of rows of one tensor: `tensor[offset : offset + rows]`."""

    name: str
    offset: int
    rows: int

    def slice(self, start: int, stop: int) -> slice:
        """Absolute rows of this block's relative rows [start, stop)."""
        return slice(self.offset + start, self.offset + stop)


@dataclass(frozen=True)
class LayerProjections:
    """Tensor names of one layer's attention projections.

    `q_weight`, `k_weight`, `v_weight` are row blocks (offset 0 unless fused). Bias blocks are None
    when the checkpoint/model has no bias for that projection.
    """

    layer: int
    module_prefix: str
    q_weight: RowBlock
    k_weight: RowBlock
    v_weight: RowBlock
    q_bias: RowBlock | None
    k_bias: RowBlock | None
    v_bias: RowBlock | None
    o_weight: str
    q_module: str
    k_module: str
    v_module: str
    o_module: str

    def qkv_tensor_names(self) -> list[str]:
        """Distinct tensor names holding this layer's q/k/v weights and biases (fused: one or two)."""
        names: list[str] = []
        for block in (self.q_weight, self.k_weight, self.v_weight, self.q_bias, self.k_bias, self.v_bias):
            if block is not None and block.name not in names:
                names.append(block.name)
        return names


@dataclass(frozen=True)
class AttentionLayout:
    """Attention geometry and tensor names of a causal LM.

    Attributes:
        model_type: HF `config.model_type`.
        num_layers (L), num_heads (H), num_kv_heads (KV), head_dim (hd), hidden_size (d).
        layers: one `LayerProjections` per layer.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layers: tuple[LayerProjections, ...]
    fused: bool = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, tensor_names: Iterable[str] | None = None) -> AttentionLayout:
        """Layout from a HF config (object or dict) and, optionally, a checkpoint's tensor names.

        With `tensor_names`, the layer prefix is matched against the names actually present (so a
        checkpoint saved with or without the leading ``model.`` works), biases are detected, and a
        missing q/k/v tensor raises a `ValueError` naming it.
        """
        cfg = config if isinstance(config, dict) else config.to_dict()
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
        if text_cfg is not None and "num_attention_heads" not in cfg:
            cfg = {**text_cfg, "model_type": cfg.get("model_type", text_cfg.get("model_type"))}
        model_type = cfg.get("model_type")
        if not model_type:
            raise ValueError("The config has no model_type; ALPS needs it to find the attention projections.")
        if not isinstance(model_type, str):
            raise ValueError(f"The config's model_type is {str(model_type)[:50]!r}, not a string.")
        spec = get_spec(model_type)
        for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
            if key not in cfg:
                raise ValueError(f"The {model_type} config lacks {key!r}; cannot derive the attention layout.")
        num_layers, num_heads, num_kv, hidden, head_dim = head_counts(cfg)
        names = set(tensor_names) if tensor_names is not None else None
        prefix_fmt = spec.layer_prefix
        if names is not None:
            prefix_fmt = _match_prefix(spec, names)
        layers = tuple(
            _layer_projections(spec, prefix_fmt, i, num_heads, num_kv, head_dim, cfg, names) for i in range(num_layers)
        )
        if names is not None:
            probe = f".{spec.fused_qkv or spec.q}.weight"
            if prefix_fmt.format(layer=num_layers) + probe in names:
                extra = prefix_fmt.format(layer=num_layers) + probe
                raise ValueError(
                    f"The checkpoint has attention tensors of layer {num_layers} ({extra}), but the config says "
                    f"num_hidden_layers={num_layers}: the config is not this checkpoint's."
                )
        return cls(
            model_type, num_layers, num_heads, num_kv, head_dim, hidden, layers, fused=spec.fused_qkv is not None
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> AttentionLayout:
        """Layout of an in-memory model (a PreTrainedModel, possibly wrapped by PEFT/DDP)."""
        inner = unwrap_model(model)
        names = [n for n, _ in inner.named_parameters()]
        return cls.from_config(inner.config, names)

    # ---- head geometry ------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per kv group: H // KV."""
        return self.num_heads // self.num_kv_heads

    def kv_group_of(self, head: int) -> int:
        """The kv group of query head `head`: head // (H // KV)."""
        return head // self.group_size

    def q_rows(self, head: int) -> slice:
        """Rows of query head `head` relative to the q block: [head*hd, (head+1)*hd)."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_rows(self, group: int) -> slice:
        """Rows of kv group `group` relative to the k (or v) block."""
        return slice(group * self.head_dim, (group + 1) * self.head_dim)

    @property
    def qkv_params_per_layer(self) -> int:
        """Number of q/k/v weight entries in one layer (biases excluded)."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * self.hidden_size

    def shape_signature(self) -> dict[str, int | str]:
        """What a HeadSelection must match to be applied to this model."""
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }

    # ---- modules ------------------------------------------------------------------------------
    def modules_of_layer(self, model: torch.nn.Module, layer: int) -> dict[str, torch.nn.Module]:
        """The q/k/v/o (or qkv/o) Linear modules of `layer` in `model`, keyed "q","k","v","o".

        For fused models "q", "k" and "v" all map to the fused module.
        """
        inner = unwrap_model(model)
        lp = self.layers[layer]
        return {key: inner.get_submodule(getattr(lp, f"{key}_module")) for key in ("q", "k", "v", "o")}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/DeepSpeed/torch.compile (accelerate's `extract_model_from_parallel`) and PEFT wrappers down to the
    module that owns `.config`. The model itself is not changed (its forward keeps any mixed-precision wrapper)."""
    import torch
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    for _ in range(8):  # wrappers accelerate does not know: a `.module` attribute and no config of their own
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            break
    return model


def _match_prefix(spec: ArchitectureSpec, names: set[str]) -> str:
    """Find the layer-prefix format that the given tensor names use (e.g. with or without `model.`)."""
    proj = spec.fused_qkv or spec.q
    probe = f".{proj}.weight"
    candidates = [
        spec.layer_prefix,
        spec.layer_prefix.removeprefix("model."),
        "model.language_model.layers.{layer}.self_attn",
    ]
    for fmt in candidates:
        if fmt.format(layer=0) + probe in names:
            return fmt
    # Fall back to any name ending in "layers.0.self_attn.<proj>.weight".
    suffix = "layers.0.self_attn" + probe
    for name in sorted(names):
        if name.endswith(suffix):
            return name[: -len(probe)].replace("layers.0.", "layers.{layer}.")
    raise ValueError(
        f"No tensor named like '{spec.layer_prefix.format(layer=0)}{probe}' in the checkpoint: "
        "a q/k/v projection is missing, or this is not a checkpoint of the architecture its config names."
    )


def _layer_projections(
    spec: ArchitectureSpec,
    prefix_fmt: str,
    layer: int,
    num_heads: int,
    num_kv: int,
    head_dim: int,
    cfg: dict,
    names: set[str] | None,
) -> LayerProjections:
    prefix = prefix_fmt.format(layer=layer)
    q_rows, kv_rows = num_heads * head_dim, num_kv * head_dim

    def need(name: str) -> str:
        if names is not None and name not in names:
            raise ValueError(f"The checkpoint is missing tensor {name!r} (layer {layer} attention projection).")
        return name

    def bias_block(module: str, offset: int, rows: int) -> RowBlock | None:
        name = f"{prefix}.{module}.bias"
        if names is None:
            present = bool(cfg.get("attention_bias")) or cfg.get("model_type") == "qwen2"
        else:
            present = name in names
        return RowBlock(name, offset, rows) if present else None

    if spec.fused_qkv:
        mod = f"{prefix}.{spec.fused_qkv}"
        w = need(f"{mod}.weight")
        blocks = [(0, q_rows), (q_rows, kv_rows), (q_rows + kv_rows, kv_rows)]
        weights = [RowBlock(w, off, n) for off, n in blocks]
        biases = [bias_block(spec.fused_qkv, off, n) for off, n in blocks]
        modules = [mod, mod, mod]
    else:
        mods = [f"{prefix}.{m}" for m in (spec.q, spec.k, spec.v)]
        weights = [RowBlock(need(f"{mods[0]}.weight"), 0, q_rows)] + [
            RowBlock(need(f"{m}.weight"), 0, kv_rows) for m in mods[1:]
        ]
        biases = [bias_block(m, 0, n) for m, n in zip((spec.q, spec.k, spec.v), (q_rows, kv_rows, kv_rows))]
        modules = mods
    return LayerProjections(
        layer=layer,
        module_prefix=prefix,
        q_weight=weights[0],
        k_weight=weights[1],
        v_weight=weights[2],
        q_bias=biases[0],
        k_bias=biases[1],
        v_bias=biases[2],
        o_weight=f"{prefix}.{spec.o}.weight",
        q_module=modules[0],
        k_module=modules[1],
        v_module=modules[2],
        o_module=f"{prefix}.{spec.o}",
    )
