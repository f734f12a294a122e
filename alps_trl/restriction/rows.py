"""Which rows (or columns) of which tensors train, and where a parameter's local shard starts.

A `RestrictedTensor` names one parameter of the unwrapped model (e.g.
``model.layers.3.self_attn.k_proj.weight``) and the global indices along one dimension that train:
rows (dim 0) for q/k/v weights and biases, columns (dim 1) for an optionally restricted o_proj.
Fused projections (Phi-3 ``qkv_proj``) collect the q, k and v blocks' rows at their `RowBlock`
offsets into one entry.

Sharded parameters (FSDP2 DTensors, Shard(0), possibly uneven) hold only a contiguous block of
rows on each rank; `local_block` returns that block's global offset so that masks and indices can
be sliced to the local shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alps_trl.localization.anatomy import AttentionLayout, RowBlock
from alps_trl.localization.selection import HeadSelection


@dataclass(frozen=True)
class RestrictedTensor:
    """One parameter whose update is restricted to some indices along `dim`.

    Attributes:
        name: parameter name in the unwrapped model's ``named_parameters()``.
        module: name of the module that owns the parameter (a projection).
        kind: "weight" or "bias".
        dim: 0 (rows: q/k/v weights and biases) or 1 (columns: o_proj weight).
        size: global length of the parameter along `dim`.
        selected: int64 [n] sorted global indices along `dim` that train (CPU).
        layer: decoder layer index.
    """

    name: str
    module: str
    kind: str
    dim: int
    size: int
    selected: torch.Tensor
    layer: int

    @property
    def num_selected(self) -> int:
        return int(self.selected.numel())

    def selected_mask(self) -> torch.Tensor:
        """bool [size]: True at the indices that train."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[self.selected] = True
        return mask


def _rows(block: RowBlock, relative: list[slice]) -> list[int]:
    rows: list[int] = []
    for sl in relative:
        rows.extend(range(block.offset + sl.start, block.offset + sl.stop))
    return rows


def restricted_tensors(
    layout: AttentionLayout, selection: HeadSelection, *, restrict_o_proj: bool = False
) -> list[RestrictedTensor]:
    """Every q/k/v weight and bias (and, with `restrict_o_proj`, o_proj weight) with its trainable indices.

    Selected query head h of layer l trains q rows ``[h*hd, (h+1)*hd)``; kv group g trains its k and v
    rows when any of its query heads is selected (``selection.kv_mask()``). Tensors of layers without
    a selected head are listed with an empty `selected`.
    """
    mask = selection.mask()
    kv_mask = selection.kv_mask()
    out: list[RestrictedTensor] = []
    for lp in layout.layers:
        layer = lp.layer
        q_rel = [layout.q_rows(h) for h in range(layout.num_heads) if mask[layer, h]]
        kv_rel = [layout.kv_rows(g) for g in range(layout.num_kv_heads) if kv_mask[layer, g]]
        parts = [
            ("weight", lp.q_module, lp.q_weight, q_rel),
            ("weight", lp.k_module, lp.k_weight, kv_rel),
            ("weight", lp.v_module, lp.v_weight, kv_rel),
            ("bias", lp.q_module, lp.q_bias, q_rel),
            ("bias", lp.k_module, lp.k_bias, kv_rel),
            ("bias", lp.v_module, lp.v_bias, kv_rel),
        ]
        merged: dict[str, tuple[str, str, list[int], int]] = {}
        for kind, module, block, rel in parts:
            if block is None:
                continue
            entry = merged.setdefault(block.name, (kind, module, [], 0))
            size = max(entry[3], block.offset + block.rows)
            merged[block.name] = (kind, module, entry[2] + _rows(block, rel), size)
        for name, (kind, module, rows, size) in merged.items():
            out.append(RestrictedTensor(name, module, kind, 0, size, _index(rows), layer))
        if restrict_o_proj:
            cols = []
            for sl in q_rel:
                cols.extend(range(sl.start, sl.stop))
            size = layout.num_heads * layout.head_dim
            out.append(RestrictedTensor(lp.o_weight, lp.o_module, "weight", 1, size, _index(cols), layer))
    return out


def _index(values: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(values)), dtype=torch.int64)


# ---- local shards ------------------------------------------------------------------------------
def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, else the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def local_block(tensor: torch.Tensor) -> tuple[int, int]:
    """(global row offset, local rows) of this process's part of `tensor` along dim 0.

    Plain tensors: (0, rows). DTensors: replicated -> (0, rows); Shard(0) (even or uneven) -> the
    offset from torch's own sharding arithmetic. Sharding on another dimension is refused, because
    ALPS masks rows.
    """
    if not is_dtensor(tensor):
        return 0, int(tensor.shape[0])
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in tensor.placements:
        if isinstance(placement, Shard) and placement.dim != 0:
            raise ValueError(
                f"A parameter of shape {tuple(tensor.shape)} is sharded on dim {placement.dim}; ALPS row "
                "restriction supports sharding on dim 0 only (FSDP2's default Shard(0)). Use FSDP2 without a "
                "custom shard_placement_fn, or DDP."
            )
        if not isinstance(placement, Shard | Replicate):
            raise ValueError(f"Unsupported DTensor placement {placement!r} for an ALPS-restricted parameter.")
    local_shape, global_offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    n_local = int(local_shape[0]) if len(local_shape) else 0
    local = tensor._local_tensor
    if tuple(local.shape) != tuple(local_shape):
        raise RuntimeError(
            f"DTensor local shard has shape {tuple(local.shape)}, expected {tuple(local_shape)} from its placements."
        )
    return int(global_offset[0]) if len(global_offset) else 0, n_local


@dataclass
class LocalPlan:
    """Precomputed, device-resident indices of one restricted parameter's local shard.

    Attributes:
        dim: 0 or 1, as in `RestrictedTensor`.
        frozen_mask: bool, broadcastable to the local tensor ([n_local, 1], [n_local] or [1, cols]):
            True where the gradient must be zeroed.
        selected: int64 [k] local indices along `dim` that train.
        positions: int64 [k] positions of those indices in `RestrictedTensor.selected` (CPU), used to
            slice snapshots taken from the full tensor.
        offset, rows: the local shard's global row offset and row count (dim 0 of the parameter).
        key: identity of the tensor this plan was made for (id, device, offset, local shape).
    """

    dim: int
    frozen_mask: torch.Tensor
    selected: torch.Tensor
    positions: torch.Tensor
    offset: int
    rows: int
    key: tuple

    def local_part(self, full_selected: torch.Tensor) -> torch.Tensor:
        """This shard's part of a tensor holding the full parameter's selected entries along `dim`.

        `full_selected` is ``full_param.index_select(dim, RestrictedTensor.selected)``.
        """
        if self.dim == 0:
            return full_selected.index_select(0, self.positions.to(full_selected.device))
        return full_selected[self.offset : self.offset + self.rows]


def plan_for(rt: RestrictedTensor, param: torch.Tensor) -> LocalPlan:
    """Build the `LocalPlan` of `rt` for `param` (plain tensor or DTensor) on the local shard's device."""
    local = local_tensor(param)
    offset, n_local = local_block(param)
    device = local.device
    sel_mask = rt.selected_mask()
    if rt.dim == 0:
        in_shard = (rt.selected >= offset) & (rt.selected < offset + n_local)
        positions = torch.nonzero(in_shard).flatten()
        selected = rt.selected[in_shard] - offset
        frozen = ~sel_mask[offset : offset + n_local]
        if local.dim() == 2:
            frozen = frozen.view(-1, 1)
    else:
        positions = torch.arange(rt.num_selected)
        selected = rt.selected.clone()
        frozen = (~sel_mask).view(1, -1)
    key = (id(param), str(device), offset, tuple(local.shape))
    return LocalPlan(rt.dim, frozen.to(device), selected.to(device), positions, offset, n_local, key)
