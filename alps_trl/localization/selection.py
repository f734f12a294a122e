"""`HeadSelection`: which attention heads train, as a reusable, versioned artifact; and the strategies.

Layer 3 (selection half). Pure array/JSON code: no model loading here. Scores are held as a numpy float64
array; torch is imported only by the torch-facing parts (`mask()`, `kv_mask()`, the seeded random
strategies), so loading or writing a heads file does not need it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from alps_trl.localization.atomic import atomic_write_file, write_text_atomic

if TYPE_CHECKING:
    import torch

    from alps_trl.localization.anatomy import AttentionLayout

FORMAT_NAME = "alps_trl.head_selection"
FORMAT_VERSION = 1
STRATEGIES = ("top_k", "random", "layer_consistent")


class HeadSelectionError(ValueError):
    """A heads file is malformed, foreign, or made for another model shape."""


# What a heads file may claim: far above any real model, low enough that its masks stay small.
_SHAPE_LIMITS = {"num_layers": 10_000, "num_heads": 65_536, "num_kv_heads": 65_536}
MAX_HEAD_COUNT = 10_000_000


def _file_int(data: dict, key: str, limit: int, optional: bool = False) -> int | None:
    """data[key] as a positive int up to `limit` (None allowed when `optional`), or a ValueError."""
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise ValueError(f"{key} is {str(value)[:50]}, not an integer in [1, {limit}].")
    return value


def _file_heads(heads: Any) -> list[tuple[int, int]]:
    """A heads file's "heads": a list of [layer, head] pairs of ints, or a ValueError."""
    if not isinstance(heads, list):
        raise ValueError(f"heads is a {type(heads).__name__}, not a list of [layer, head] pairs.")
    out = []
    for pair in heads:
        ok = isinstance(pair, list) and len(pair) == 2
        if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"heads holds {str(pair)[:50]}, not a [layer, head] pair of integers.")
        out.append((pair[0], pair[1]))
    return out


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def validate_ratio(ratio: float) -> float:
    """Return `ratio` as float if it lies in (0, 1], else raise a ValueError saying what to change."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ALPS ratio must be a number in (0, 1], got {ratio!r}.") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"ALPS ratio must be in (0, 1] (the fraction of all attention heads that train; the paper uses 0.1), "
            f"got {ratio!r}."
        )
    return value


def num_selected(ratio: float, num_layers: int, num_heads: int) -> int:
    """K = ceil(ratio * L * H), with the product rounded to 9 decimals first (0.1 * 60 -> 6, not 7)."""
    ratio = validate_ratio(ratio)
    return max(1, math.ceil(round(ratio * num_layers * num_heads, 9)))


def as_score_array(scores: Any) -> np.ndarray:
    """float64 numpy copy of scores given as a numpy array, a (CPU or device) torch tensor or nested lists."""
    if hasattr(scores, "detach"):  # a torch tensor: no torch import needed to recognise one
        scores = scores.detach().cpu().double().numpy()
    return np.array(scores, dtype=np.float64)


def _descending_order(flat: np.ndarray) -> np.ndarray:
    """Indices of `flat` by descending value; equal values keep ascending index (a stable sort)."""
    return np.argsort(-flat, kind="stable")


def select_top_k(scores: np.ndarray | torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the highest scores over the whole model.

    Args:
        scores: float [L, H], a numpy array or a torch tensor.
    Ties break by (layer, head) ascending: a stable sort on the row-major flattening.
    """
    values = as_score_array(scores)
    order = _descending_order(values.reshape(-1))[:k]
    num_heads = values.shape[1]
    return sorted((int(i) // num_heads, int(i) % num_heads) for i in order)


def select_random(num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """k heads uniformly at random over the whole model (seeded, independent of global RNG)."""
    import torch  # torch's generator: the same seed gives the same heads as earlier versions

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(num_layers * num_heads, generator=gen)[:k]
    return sorted((int(i) // num_heads, int(i) % num_heads) for i in idx)


def select_layer_consistent(num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """LC baseline: the same number of random heads in every layer, ceil(k / L) per layer."""
    import torch

    per_layer = min(num_heads, max(1, math.ceil(round(k / num_layers, 9))))
    gen = torch.Generator().manual_seed(seed)
    heads = []
    for layer in range(num_layers):
        for h in torch.randperm(num_heads, generator=gen)[:per_layer]:
            heads.append((layer, int(h)))
    return sorted(heads)


@dataclass
class HeadSelection:
    """The set of trainable attention heads of a model.

    Attributes:
        num_layers, num_heads, num_kv_heads: the model's L, H, KV.
        heads: sorted list of (layer, query_head) pairs that train.
        scores: float64 [L, H] numpy array of localization scores, or None for score-free strategies (a torch
            tensor or nested lists given here are converted).
        metric, ratio, strategy: how the selection was made.
        head_dim, hidden_size, model_type: model shape, checked by `check_compatible` when known.
        provenance: free-form strings (base/task names, seed, ...).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    heads: list[tuple[int, int]]
    scores: np.ndarray | None = None
    metric: str = "pad"
    ratio: float = 0.1
    strategy: str = "top_k"
    head_dim: int | None = None
    hidden_size: int | None = None
    model_type: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # Where it was loaded from (e.g. "Heads file 'heads.json'"), named by errors; not saved.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.heads = sorted({(int(layer), int(h)) for layer, h in self.heads})
        if min(self.num_layers, self.num_heads, self.num_kv_heads) < 1:
            raise HeadSelectionError(
                f"num_layers={self.num_layers}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: each "
                "must be at least 1."
            )
        if self.num_heads % self.num_kv_heads:
            raise HeadSelectionError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )
        for layer, h in self.heads:
            if not (0 <= layer < self.num_layers and 0 <= h < self.num_heads):
                raise HeadSelectionError(
                    f"Head ({layer}, {h}) is outside a model of {self.num_layers} layers x {self.num_heads} heads."
                )
        if self.scores is not None:
            self.scores = as_score_array(self.scores)
            if tuple(self.scores.shape) != (self.num_layers, self.num_heads):
                raise HeadSelectionError(
                    f"scores have shape {tuple(self.scores.shape)}, expected ({self.num_layers}, {self.num_heads})."
                )

    # ---- masks --------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def mask_array(self) -> np.ndarray:
        """bool numpy [L, H]: True where the query head trains."""
        m = np.zeros((self.num_layers, self.num_heads), dtype=bool)
        for layer, h in self.heads:
            m[layer, h] = True
        return m

    def kv_mask_array(self) -> np.ndarray:
        """bool numpy [L, KV]: True where a kv group has at least one selected query head."""
        return self.mask_array().reshape(self.num_layers, self.num_kv_heads, self.group_size).any(axis=-1)

    def mask(self) -> torch.Tensor:
        """bool torch [L, H]: True where the query head trains."""
        import torch

        return torch.from_numpy(self.mask_array())

    def kv_mask(self) -> torch.Tensor:
        """bool torch [L, KV]: True where a kv group has at least one selected query head."""
        import torch

        return torch.from_numpy(self.kv_mask_array())

    def heads_in_layer(self, layer: int) -> list[int]:
        return [h for ly, h in self.heads if ly == layer]

    def trainable_qkv_params(self, head_dim: int | None = None, hidden_size: int | None = None) -> int:
        """Number of trainable q/k/v weight entries (biases excluded): selected q rows + k/v rows of their groups."""
        hd = head_dim or self.head_dim
        d = hidden_size or self.hidden_size
        if hd is None or d is None:
            raise ValueError("head_dim and hidden_size are unknown: pass them explicitly.")
        rows = len(self.heads) * hd + 2 * int(self.kv_mask_array().sum()) * hd
        return rows * d

    # ---- identity -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short sha256 of the shape and selected heads: equal on every rank or something is wrong."""
        payload = json.dumps([self.num_layers, self.num_heads, self.num_kv_heads, self.heads])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadSelection):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    # ---- compatibility ------------------------------------------------------------------------
    def check_compatible(self, model_or_config: Any) -> None:
        """Raise HeadSelectionError if this selection was made for a different model shape.

        Accepts a model, a PretrainedConfig, a config dict, or an `AttentionLayout`.
        """
        from alps_trl.localization.anatomy import AttentionLayout

        if isinstance(model_or_config, AttentionLayout):
            layout = model_or_config
        elif _is_torch_module(model_or_config):
            layout = AttentionLayout.from_model(model_or_config)
        else:
            layout = AttentionLayout.from_config(model_or_config)
        sig = layout.shape_signature()
        mine = {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }
        for key, value in mine.items():
            if value is not None and value != sig[key]:
                made = f"{self.source} was made" if self.source else "This head selection was made"
                raise HeadSelectionError(
                    f"{made} for a model with {key}={value}, but the model has "
                    f"{key}={sig[key]} ({self._shape_text()} vs {layout.model_type} with {sig['num_layers']} layers x "
                    f"{sig['num_heads']} heads, {sig['num_kv_heads']} kv heads). Localize heads for this model "
                    "(drop alps_heads / head_selection) or pass the heads file made for it."
                )

    def _shape_text(self) -> str:
        mt = self.model_type or "model"
        return f"{mt} with {self.num_layers} layers x {self.num_heads} heads, {self.num_kv_heads} kv heads"

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "model_type": self.model_type,
            "metric": self.metric,
            "ratio": self.ratio,
            "strategy": self.strategy,
            "heads": [list(h) for h in self.heads],
            "scores": None if self.scores is None else self.scores.tolist(),
            "provenance": self.provenance,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "heads data") -> HeadSelection:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise HeadSelectionError(
                f'{source} is not an ALPS head selection (expected a JSON object with "format": "{FORMAT_NAME}"). '
                "Create one with `alps-localize BASE TASK --output heads.json` or HeadSelection.save()."
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise HeadSelectionError(
                f"{source} has format_version {version!r}; this alps_trl reads version {FORMAT_VERSION}. "
                "Re-create it with this version of alps-localize."
            )
        try:
            shape = {key: _file_int(data, key, limit) for key, limit in _SHAPE_LIMITS.items()}
            if shape["num_layers"] * shape["num_heads"] > MAX_HEAD_COUNT:
                raise ValueError(
                    f"{shape['num_layers']} layers x {shape['num_heads']} heads is more than {MAX_HEAD_COUNT} heads."
                )
            optional = {key: _file_int(data, key, 1 << 24, optional=True) for key in ("head_dim", "hidden_size")}
            heads = _file_heads(data.get("heads"))
            model_type = data.get("model_type")
            if model_type is not None and not isinstance(model_type, str):
                raise ValueError(f"model_type is {str(model_type)[:50]!r}, not a string.")
            provenance = data.get("provenance") or {}
            if not isinstance(provenance, dict):
                raise ValueError(f"provenance is a {type(provenance).__name__}, not a JSON object.")
            sel = cls(
                **shape,
                heads=heads,
                scores=data.get("scores"),
                metric=str(data.get("metric", "pad")),
                ratio=float(data.get("ratio", 0.1)),
                strategy=str(data.get("strategy", "top_k")),
                **optional,
                model_type=model_type,
                provenance=dict(provenance),
            )
        except HeadSelectionError as err:
            raise HeadSelectionError(f"{source} is inconsistent: {err}") from None
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise HeadSelectionError(f"{source} is malformed ({type(err).__name__}: {str(err)[:200]}).") from None
        stored = data.get("fingerprint")
        if stored is not None and stored != sel.fingerprint():
            raise HeadSelectionError(f"{source} was edited: its fingerprint does not match its heads.")
        sel.source = source
        return sel

    def save(self, path: str | os.PathLike) -> None:
        """Write this selection as JSON (atomically, `atomic_write_file`: a crash or a kill leaves the previous
        file or the new one, never part of one; a failed write raises an OSError naming `path`)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadSelection:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise HeadSelectionError(f"Heads file {path!r} does not exist.")
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HeadSelectionError(f"Heads file {path!r} is not valid JSON: {err}.") from None
        except RecursionError:
            raise HeadSelectionError(f"Heads file {path!r} is not valid JSON (it nests too deeply).") from None
        return cls.from_dict(data, source=f"Heads file {path!r}")

    # ---- presentation -------------------------------------------------------------------------
    def plot_heatmap(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Save a PNG heatmap (layers x heads) of the scores, selected heads outlined.

        Without scores the selection mask itself is drawn.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        data = self.scores if self.scores is not None else self.mask_array().astype(np.float64)
        label = f"{self.metric} score" if self.scores is not None else "selected"
        peak = float(np.abs(data).max()) if data.size else 0.0
        if self.scores is not None and peak > 0 and not 1e-2 <= peak < 1e3:
            # Scores are often ~1e-9: scale them into the label instead of colorbar offset text, which
            # matplotlib draws over the title.
            exponent = int(np.floor(np.log10(peak)))
            data = data / 10.0**exponent
            label = f"{label} (x 1e{exponent})"
        width = max(4.0, min(16.0, 0.35 * self.num_heads + 2))
        height = max(3.0, min(14.0, 0.3 * self.num_layers + 1.5))
        fig, ax = plt.subplots(figsize=(width, height))
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        for layer, h in self.heads:
            ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(
            title or f"ALPS heads: {len(self.heads)}/{self.num_layers * self.num_heads} selected ({self.strategy})"
        )
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        try:
            with atomic_write_file(path, suffix=".png") as temp:
                fig.savefig(temp, dpi=100, format="png")
        finally:
            plt.close(fig)

    def summary(self, top: int = 10) -> str:
        """Compact text: count, per-layer counts, top heads and score statistics."""
        total = self.num_layers * self.num_heads
        lines = [
            f"{len(self.heads)}/{total} heads selected ({self.strategy}, metric={self.metric}, ratio={self.ratio})"
        ]
        per_layer = [len(self.heads_in_layer(i)) for i in range(self.num_layers)]
        lines.append("per layer: " + " ".join(f"L{i}:{n}" for i, n in enumerate(per_layer)))
        if self.scores is not None:
            flat = self.scores.reshape(-1)
            order = _descending_order(flat)[:top]
            tops = ", ".join(
                f"({int(i) // self.num_heads},{int(i) % self.num_heads})={float(flat[i]):.3e}" for i in order
            )
            lines.append(f"top heads: {tops}")
            lower_median = np.sort(flat)[(flat.size - 1) // 2]  # the lower middle value for even counts
            lines.append(
                f"scores: min {float(flat.min()):.3e}  median {float(lower_median):.3e}  "
                f"mean {float(flat.mean()):.3e}  max {float(flat.max()):.3e}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"HeadSelection({len(self.heads)} of {self.num_layers}x{self.num_heads} heads, kv={self.num_kv_heads}, "
            f"strategy={self.strategy!r}, metric={self.metric!r})"
        )


def selection_for_layout(
    layout: AttentionLayout,
    heads: list[tuple[int, int]],
    *,
    scores: Any = None,
    metric: str,
    ratio: float,
    strategy: str,
    provenance: dict[str, Any] | None = None,
) -> HeadSelection:
    """A `HeadSelection` of `heads` carrying the model shape of `layout` (L, H, KV, head_dim, hidden, model_type).

    Args:
        scores: float [L, H] (numpy, torch or nested lists) or None for score-free strategies.
    """
    return HeadSelection(
        num_layers=layout.num_layers,
        num_heads=layout.num_heads,
        num_kv_heads=layout.num_kv_heads,
        heads=heads,
        scores=scores,
        metric=metric,
        ratio=ratio,
        strategy=strategy,
        head_dim=layout.head_dim,
        hidden_size=layout.hidden_size,
        model_type=layout.model_type,
        provenance=dict(provenance or {}),
    )
