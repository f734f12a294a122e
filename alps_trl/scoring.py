"""Head scores: how far each attention head's distribution moved between a base and a task model.

Layer 3 (scoring half), pure tensor code; the definition is fixed by ALPS_METHOD.md:

    Wo[h] = Wq[h]^T @ (Wk[g] @ Wv[g]^T)        [d, hd], g = h // (H // KV)
    P[h]  = softmax(flatten(Wo[h]) / tau)       N = d * hd entries, row-major
    pad   = W1(P_base[h], P_task[h]) on N evenly spaced points of [0, 1]
          = sum_{i < N-1} |C_base[i] - C_task[i]| / (N - 1),  C = cumsum(P)

Everything runs in float64, one layer at a time, all heads of a layer (in chunks of kv groups) per
batched matmul. The ablation distances of the paper (kl, js, cosine, euclidean) use the same P.
`head_logits` + `distribution_distance` state the definition directly; `score_layer` computes the
same numbers from Wo^T (a faster matmul shape) and forms the row-major CDF without transposing back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from alps_trl.weights import WeightSource, open_weight_source

METRICS = ("pad", "kl", "js", "cosine", "euclidean")

# Elements (float64) of one [heads, N] logits chunk: bounds the working set per step to a few tens of MB
# whatever the model size, while keeping each batched op large enough to be efficient.
_CHUNK_ELEMENTS = 1 << 22


def validate_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"Unknown ALPS metric {metric!r}; choose one of {', '.join(METRICS)} (pad = the paper's W1).")
    return metric


def validate_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"ALPS temperature must be a positive number, got {temperature!r}.") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"ALPS temperature must be a positive finite number, got {temperature!r}.")
    return value


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`None` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available; use --device cpu.")
    return dev


def head_logits(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened head transformation matrices of one layer (or of a chunk of its kv groups).

    Args:
        wq: [H, hd, d]; wk, wv: [KV, hd, d], with H a multiple of KV (query head h -> group h // (H // KV)).
        out: optional contiguous [H, d * hd] buffer to write into.
    Returns:
        [H, d * hd]: row h is flatten(Wq[h]^T @ (Wk[g] @ Wv[g]^T)) in row-major order, in the inputs' dtype.
    """
    num_heads, head_dim, hidden = wq.shape
    num_kv = wk.shape[0]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} kv heads.")
    group = num_heads // num_kv
    kv_product = wk @ wv.transpose(-1, -2)  # [KV, hd, hd]: Wk @ Wv^T first, d*hd^2 per group
    wq_t = wq.reshape(num_kv, group, head_dim, hidden).transpose(-1, -2)  # [KV, G, d, hd]
    kv_b = kv_product.unsqueeze(1).expand(num_kv, group, head_dim, head_dim)
    if out is None:
        return torch.matmul(wq_t, kv_b).reshape(num_heads, hidden * head_dim)
    torch.matmul(wq_t, kv_b, out=out.view(num_kv, group, hidden, head_dim))
    return out


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row softmax in place (max-subtracted), so the large [n, N] buffers are never reallocated."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    if x.device.type == "cpu" and x.is_contiguous():
        # numpy's vectorised float64 exp is ~1.7x faster than torch's on CPU; exp dominates this step.
        np.exp(x.numpy(), out=x.numpy())
    else:
        x.exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def distribution_distance(
    logits_base: torch.Tensor, logits_task: torch.Tensor, metric: str = "pad", temperature: float = 1.0
) -> torch.Tensor:
    """Distance between softmax(logits_base / tau) and softmax(logits_task / tau), row by row.

    Args:
        logits_base, logits_task: float64 [n, N], contiguous. Both are overwritten (used as scratch space).
    Returns:
        float64 [n]: pad (W1 on evenly spaced points), kl = KL(P_base || P_task) (nats), js (nats),
        cosine distance 1 - cos, or euclidean ||P_base - P_task||_2.
    """
    if temperature != 1.0:
        logits_base.div_(temperature)
        logits_task.div_(temperature)
    n_points = logits_base.shape[-1]
    if metric == "pad":
        p_base, p_task = _softmax_(logits_base), _softmax_(logits_task)
        # cumsum of the difference, not the difference of two cumsums: the CDFs agree to ~1e-9 and their
        # separate rounding errors (~1e-16 * C) would otherwise swamp small scores.
        cdf_gap = torch.cumsum(p_base.sub_(p_task), dim=-1, out=p_task)
        return torch.linalg.vector_norm(cdf_gap[:, :-1], ord=1, dim=-1) / (n_points - 1)
    if metric in ("kl", "js"):
        log_base = torch.log_softmax(logits_base, dim=-1)
        log_task = torch.log_softmax(logits_task, dim=-1)
        if metric == "kl":
            return (log_base.exp() * (log_base - log_task)).sum(dim=-1).clamp_min_(0.0)
        p_base, p_task = log_base.exp_(), log_task.exp_()
        mid = 0.5 * (p_base + p_task)
        # xlogy(p, p / m): exactly 0 where p == m, and where p underflows to 0.
        js = 0.5 * torch.special.xlogy(p_base, p_base / mid).sum(dim=-1)
        js += 0.5 * torch.special.xlogy(p_task, p_task / mid).sum(dim=-1)
        return js.clamp_min_(0.0)
    p_base, p_task = _softmax_(logits_base), _softmax_(logits_task)
    if metric == "cosine":
        # 1 - cos(a, b) == |a/|a| - b/|b||^2 / 2: no cancellation when the distributions nearly agree.
        p_base.div_(p_base.norm(dim=-1, keepdim=True))
        p_task.div_(p_task.norm(dim=-1, keepdim=True))
        return 0.5 * torch.linalg.vector_norm(p_base.sub_(p_task), dim=-1).square_()
    if metric == "euclidean":
        return torch.linalg.vector_norm(p_base.sub_(p_task), dim=-1)
    raise ValueError(validate_metric(metric))


def score_layer(
    base_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    task_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    metric: str = "pad",
    temperature: float = 1.0,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores of all query heads of one layer.

    Args:
        base_qkv, task_qkv: (wq [H, hd, d], wk [KV, hd, d], wv [KV, hd, d]) of any floating dtype, on one
            device; each chunk of kv groups is converted to float64 before any arithmetic.
        buffers: optional dict that keeps the float64 scratch buffers between calls (one per model run).
    Returns:
        float64 [H] on that device.
    """
    wq_b, wk_b, wv_b = base_qkv
    wq_t, wk_t, wv_t = task_qkv
    num_heads, head_dim, hidden = wq_b.shape
    num_kv = wk_b.shape[0]
    group = num_heads // num_kv
    groups_per_chunk = max(1, min(num_kv, _CHUNK_ELEMENTS // (group * head_dim * hidden)))
    # Reused float64 buffers: fresh multi-MB allocations cost page faults comparable to the math itself.
    buffers = {} if buffers is None else buffers
    shape = (groups_per_chunk * group, head_dim, hidden)
    if "base" not in buffers or buffers["base"].shape != shape or buffers["base"].device != wq_b.device:
        for key in ("base", "task", "wq"):
            buffers[key] = torch.empty(shape, dtype=torch.float64, device=wq_b.device)
    out = []
    for g0 in range(0, num_kv, groups_per_chunk):
        g1 = min(num_kv, g0 + groups_per_chunk)
        rows = slice(g0 * group, g1 * group)
        n = g1 * group - g0 * group
        logits_b = _transposed_logits(wq_b[rows], wk_b[g0:g1], wv_b[g0:g1], buffers["base"][:n], buffers["wq"][:n])
        logits_t = _transposed_logits(wq_t[rows], wk_t[g0:g1], wv_t[g0:g1], buffers["task"][:n], buffers["wq"][:n])
        out.append(_transposed_distance(logits_b, logits_t, metric, temperature))
    return torch.cat(out)


def _transposed_logits(
    wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, out: torch.Tensor, wq64: torch.Tensor
) -> torch.Tensor:
    """Wo[h]^T = (Wk[g] @ Wv[g]^T)^T @ Wq[h] for a chunk of kv groups, into `out` [n, hd, d] (float64).

    The transposed product is a batch of [hd, hd] @ [hd, d] matmuls, several times faster than
    Wq[h]^T @ (Wk Wv^T) with its tall [d, hd] @ [hd, hd] shape; `_transposed_distance` accounts for
    the layout. `wq64` is scratch space of out's shape for the float64 copy of Wq.
    """
    num_heads, head_dim, hidden = wq.shape
    num_kv = wk.shape[0]
    group = num_heads // num_kv
    wq64.copy_(wq)
    wk, wv = wk.to(torch.float64), wv.to(torch.float64)
    kv_t = (wv @ wk.transpose(-1, -2)).unsqueeze(1).expand(num_kv, group, head_dim, head_dim)  # (Wk Wv^T)^T
    torch.matmul(kv_t, wq64.view(num_kv, group, head_dim, hidden), out=out.view(num_kv, group, head_dim, hidden))
    return out


def _cumsum_dim1_(x: torch.Tensor) -> torch.Tensor:
    """In-place cumsum of [n, hd, d] over dim 1 (same additions, same order, as torch.cumsum).

    On CPU, torch.cumsum along a non-last dim is ~20x slower than hd row additions, and hd small
    multi-threaded torch ops stall on a busy machine; numpy's single-threaded adds do neither.
    """
    if x.device.type != "cpu":
        return x.cumsum_(dim=1)
    a = x.numpy()
    for j in range(1, a.shape[1]):
        np.add(a[:, j], a[:, j - 1], out=a[:, j])
    return x


def _transposed_distance(
    logits_base: torch.Tensor, logits_task: torch.Tensor, metric: str, temperature: float
) -> torch.Tensor:
    """`distribution_distance` for logits held as Wo^T, i.e. [n, hd, d] (both are overwritten).

    Only "pad" depends on the order of the N entries: it needs the CDF along row-major Wo [d, hd], whose
    position (i, j) lies at [j, i] here. That CDF is the sum of whole rows before row i plus the partial
    row up to j, computed without transposing back:
        C[i, j] = sum_{i' < i} rowsum[i'] + colcumsum[j, i],  colcumsum = cumsum over the hd axis.
    """
    n, head_dim, hidden = logits_base.shape
    if metric != "pad":
        return distribution_distance(logits_base.view(n, -1), logits_task.view(n, -1), metric, temperature)
    if temperature != 1.0:
        logits_base.div_(temperature)
        logits_task.div_(temperature)
    p_base = _softmax_(logits_base.view(n, -1)).view(n, head_dim, hidden)
    p_task = _softmax_(logits_task.view(n, -1)).view(n, head_dim, hidden)
    # cumsum of the difference, not the difference of two cumsums: the CDFs agree to ~1e-9 and their
    # separate rounding errors (~1e-16 * C) would otherwise swamp small scores.
    partial = _cumsum_dim1_(p_base.sub_(p_task))  # partial[j, i] = sum_{j' <= j} D[i, j']
    row_sums = partial[:, -1, :]
    rows_before = torch.cumsum(row_sums, dim=-1).sub_(row_sums)  # [n, d]: sum of rows i' < i
    cdf_gap = partial.add_(rows_before.unsqueeze(1))
    cdf_gap[:, -1, -1] = 0.0  # the last point (i = d-1, j = hd-1) is not part of the sum
    return torch.linalg.vector_norm(cdf_gap.view(n, -1), ord=1, dim=-1) / (head_dim * hidden - 1)


def check_same_shape(base: WeightSource, task: WeightSource) -> None:
    """Raise ValueError if base and task differ in architecture or in any q/k/v tensor shape.

    The message names the first mismatching tensor (layer order, q before k before v).
    """
    lb, lt = base.layout, task.layout
    if lb.model_type != lt.model_type:
        raise ValueError(
            f"Base and task models have different architectures: base {base.name!r} is {lb.model_type!r}, task "
            f"{task.name!r} is {lt.model_type!r}. The task model must be a fine-tune of the base."
        )
    for layer in range(max(lb.num_layers, lt.num_layers)):
        for role in ("q", "k", "v"):
            if layer >= lt.num_layers or layer >= lb.num_layers:
                present, missing = (base, task) if layer >= lt.num_layers else (task, base)
                name = getattr(present.layout.layers[layer], f"{role}_weight").name
                raise ValueError(
                    f"Base and task models differ in depth: tensor {name!r} exists in {present.name!r} "
                    f"({present.layout.num_layers} layers) but not in {missing.name!r} "
                    f"({missing.layout.num_layers} layers)."
                )
            block_b = getattr(lb.layers[layer], f"{role}_weight")
            block_t = getattr(lt.layers[layer], f"{role}_weight")
            shape_b, shape_t = base.tensor_shape(block_b.name), task.tensor_shape(block_t.name)
            if shape_b != shape_t or block_b.rows != block_t.rows or block_b.offset != block_t.offset:
                raise ValueError(
                    f"Base and task models differ in shape at tensor {block_b.name!r}: {list(shape_b)} in base "
                    f"{base.name!r} vs {list(shape_t)} in task {task.name!r}. The task model must have the base's "
                    "architecture and size."
                )
    sig_b, sig_t = lb.shape_signature(), lt.shape_signature()
    for key in sig_b:
        if sig_b[key] != sig_t[key]:
            raise ValueError(
                f"Base and task models differ in {key}: {sig_b[key]} in base {base.name!r} vs {sig_t[key]} in task "
                f"{task.name!r}."
            )


def open_pair(base: Any, task: Any, trust_remote_code: bool = False) -> tuple[WeightSource, WeightSource]:
    """Open both models for streaming and check that their shapes match (before any scoring work)."""
    src_b = open_weight_source(base, trust_remote_code=trust_remote_code)
    src_t = open_weight_source(task, trust_remote_code=trust_remote_code)
    check_same_shape(src_b, src_t)
    return src_b, src_t


def score_heads(
    base: Any,
    task: Any,
    *,
    metric: str = "pad",
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """Per-head scores of how much the task model moved each attention head.

    Args:
        base, task: anything `open_weight_source` accepts (checkpoint dir, cached hub id, loaded model,
            WeightSource).
        metric: "pad" (W1, the paper's), "kl", "js", "cosine" or "euclidean".
        temperature: softmax temperature tau (> 0).
        device: where to compute; None -> CUDA if available, else CPU.
        progress: show a tqdm bar over layers.
    Returns:
        float64 [L, H] on CPU; higher = moved more.
    Raises:
        ValueError: unknown metric, bad temperature, or base/task of different architecture or shape.
    """
    metric = validate_metric(metric)
    temperature = validate_temperature(temperature)
    dev = resolve_device(device)
    src_b, src_t = open_pair(base, task, trust_remote_code)
    layout = src_b.layout
    scores = torch.empty(layout.num_layers, layout.num_heads, dtype=torch.float64)
    layers = range(layout.num_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Scoring heads", unit="layer")
    buffers: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            # Stored dtype here; score_layer converts chunk by chunk, keeping float64 copies small.
            base_qkv = src_b.layer_qkv(layer, device=dev, dtype=None)
            task_qkv = src_t.layer_qkv(layer, device=dev, dtype=None)
            scores[layer] = score_layer(base_qkv, task_qkv, metric, temperature, buffers).cpu()
    return scores
