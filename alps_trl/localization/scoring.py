"""Head scores: how far each attention head's distribution moved between a base and a task model.

Layer 3 (scoring half), pure array code; the definition (docs/method.md, "Scoring a head: PAD"):

    Wo[h] = Wq[h]^T @ (Wk[g] @ Wv[g]^T)        [d, hd], g = h // (H // KV)
    P[h]  = softmax(flatten(Wo[h]) / tau)       N = d * hd entries, row-major
    pad   = W1(P_base[h], P_task[h]) on N evenly spaced points of [0, 1]
          = sum_{i < N-1} |C_base[i] - C_task[i]| / (N - 1),  C = cumsum(P)

Everything runs in float64, one layer at a time, all heads of a layer (in chunks of kv groups) per
batched matmul. The ablation distances of the paper (kl, js, cosine, euclidean) use the same P.
`head_logits` + `distribution_distance` state the definition directly; `score_layer` computes the
same numbers from Wo^T (a faster matmul shape) and forms the row-major CDF without transposing back.

The math is written once against `alps_trl.localization.array_ops`: numpy computes it on CPU (a checkpoint is then
scored without importing torch), torch on CUDA. `score_heads` returns a torch tensor (the library API),
`score_array` the same numbers as a numpy array.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from alps_trl.localization.array_ops import ops_for
from alps_trl.localization.weights import WeightSource, open_weight_source

if TYPE_CHECKING:
    import torch

METRICS = ("pad", "kl", "js", "cosine", "euclidean")
MATMUL_DTYPES = ("float64", "float32")

# Elements (float64) of one [heads, N] logits chunk (at least one kv group): bounds the working set per
# step whatever the model size. Small chunks (4 MB: one kv group of a 1B model) stay cache-friendly; each
# matmul is still a few hd x hd x d products, large enough for BLAS.
_CHUNK_ELEMENTS = 1 << 19


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


def cuda_impossible() -> bool:
    """True when there is certainly no usable CUDA device, found without importing torch.

    Decides whether the default device needs torch's own answer: with CUDA_VISIBLE_DEVICES empty, on a
    Linux machine without GPU device nodes, or with a CPU-only torch build there can be no CUDA.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    if sys.platform.startswith("linux"):
        nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/proc/driver/nvidia")
        if not any(os.path.exists(node) for node in nodes):
            return True
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True
    version_py = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(version_py) as f:
            text = f.read()
    except OSError:
        return False
    # A CPU-only build says `cuda: Optional[str] = None` and `hip: Optional[str] = None`.
    builds = [line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith(("cuda", "hip"))]
    return bool(builds) and all(value == "None" for value in builds)


def resolve_device(device: torch.device | str | None) -> str:
    """The device to compute on, as a string ("cpu", "cuda", "cuda:1", ...).

    `None` -> "cuda" when available, else "cpu". "cpu" is resolved without importing torch.
    """
    if device is None:
        if "torch" not in sys.modules and cuda_impossible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str) and (device == "cpu" or device.startswith("cpu:")):
        return "cpu"
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available; use --device cpu.")
    return "cpu" if dev.type == "cpu" else str(dev)


# ---- the math, written once for numpy arrays and torch tensors (alps_trl.localization.array_ops) ---------------
def head_logits(wq: Any, wk: Any, wv: Any, out: Any = None) -> Any:
    """Flattened head transformation matrices of one layer (or of a chunk of its kv groups).

    Args:
        wq: [H, hd, d]; wk, wv: [KV, hd, d], with H a multiple of KV (query head h -> group h // (H // KV)).
            numpy arrays or torch tensors (all of one kind).
        out: optional contiguous [H, d * hd] buffer to write into.
    Returns:
        [H, d * hd]: row h is flatten(Wq[h]^T @ (Wk[g] @ Wv[g]^T)) in row-major order, in the inputs' dtype.
    """
    ops = ops_for(wq)
    num_heads, head_dim, hidden = wq.shape
    num_kv = wk.shape[0]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} kv heads.")
    group = num_heads // num_kv
    kv_product = ops.matmul(wk, ops.swap_last(wv))  # [KV, hd, hd]: Wk @ Wv^T first, d*hd^2 per group
    wq_t = ops.swap_last(wq.reshape(num_kv, group, head_dim, hidden))  # [KV, G, d, hd]
    kv_b = ops.expand(kv_product[:, None], (num_kv, group, head_dim, head_dim))
    if out is None:
        return ops.matmul(wq_t, kv_b).reshape(num_heads, hidden * head_dim)
    ops.matmul(wq_t, kv_b, out=out.reshape(num_kv, group, hidden, head_dim))
    return out


def _softmax_(x: Any) -> Any:
    """Row softmax in place (max-subtracted), so the large [n, N] buffers are never reallocated."""
    ops = ops_for(x)
    x -= ops.max(x)
    ops.exp_(x)
    x /= ops.sum(x)
    return x


def _log_softmax_(x: Any) -> Any:
    """Row log-softmax in place."""
    ops = ops_for(x)
    x -= ops.max(x)
    x -= ops.log(ops.sum(ops.exp(x)))
    return x


def distribution_distance(logits_base: Any, logits_task: Any, metric: str = "pad", temperature: float = 1.0) -> Any:
    """Distance between softmax(logits_base / tau) and softmax(logits_task / tau), row by row.

    Args:
        logits_base, logits_task: float64 [n, N], contiguous numpy arrays or torch tensors. Both are
            overwritten (used as scratch space).
    Returns:
        float64 [n]: pad (W1 on evenly spaced points), kl = KL(P_base || P_task) (nats), js (nats),
        cosine distance 1 - cos, or euclidean ||P_base - P_task||_2.
    """
    ops = ops_for(logits_base)
    if temperature != 1.0:
        logits_base /= temperature
        logits_task /= temperature
    n_points = logits_base.shape[-1]
    if metric == "pad":
        p_base, p_task = _softmax_(logits_base), _softmax_(logits_task)
        # cumsum of the difference, not the difference of two cumsums: the CDFs agree to ~1e-9 and their
        # separate rounding errors (~1e-16 * C) would otherwise swamp small scores.
        p_base -= p_task
        cdf_gap = ops.cumsum(p_base)
        return ops.abs_sum(cdf_gap[:, :-1]) / (n_points - 1)
    if metric in ("kl", "js"):
        log_base, log_task = _log_softmax_(logits_base), _log_softmax_(logits_task)
        p_base = ops.exp(log_base)
        if metric == "kl":
            log_base -= log_task
            return ops.clamp_min_(ops.sum(p_base * log_base, keepdim=False), 0.0)
        p_task = ops.exp(log_task)
        mid = (p_base + p_task) * 0.5
        js = ops.relative_entropy_sum(p_base, mid) * 0.5
        js += ops.relative_entropy_sum(p_task, mid) * 0.5
        return ops.clamp_min_(js, 0.0)
    p_base, p_task = _softmax_(logits_base), _softmax_(logits_task)
    if metric == "cosine":
        # 1 - cos(a, b) == |a/|a| - b/|b||^2 / 2: no cancellation when the distributions nearly agree.
        p_base /= ops.norm(p_base, keepdim=True)
        p_task /= ops.norm(p_task, keepdim=True)
        p_base -= p_task
        return ops.norm(p_base) ** 2 * 0.5
    if metric == "euclidean":
        p_base -= p_task
        return ops.norm(p_base)
    raise ValueError(validate_metric(metric))


def score_layer(
    base_qkv: tuple[Any, Any, Any],
    task_qkv: tuple[Any, Any, Any],
    metric: str = "pad",
    temperature: float = 1.0,
    buffers: dict[str, Any] | None = None,
    matmul_dtype: str = "float64",
    parallel: Executor | None = None,
) -> Any:
    """Scores of all query heads of one layer.

    Args:
        base_qkv, task_qkv: (wq [H, hd, d], wk [KV, hd, d], wv [KV, hd, d]) of any floating dtype, all numpy
            arrays (CPU) or all torch tensors on one device; each chunk of kv groups is converted to
            `matmul_dtype` before any arithmetic.
        buffers: optional dict that keeps the scratch buffers between calls (one per model run).
        matmul_dtype: "float64", or "float32" for the logits' matrix products only (several times faster; the
            logits are then widened and softmax, CDF and distance still run in float64). float32 products
            carry a relative error of ~1e-7 into the logits: use them where that cannot change what the
            scores are used for (see `localization.localize.localize_heads`, precision="mixed").
        parallel: an executor with a free worker: the base model's half of each chunk runs there, the task's
            here (same results, the two halves touch separate buffers).
    Returns:
        float64 [H], numpy or torch (on the inputs' device) like the inputs.
    """
    wq_b, wk_b, wv_b = base_qkv
    wq_t, wk_t, wv_t = task_qkv
    ops = ops_for(wq_b)
    num_heads, head_dim, hidden = wq_b.shape
    num_kv = wk_b.shape[0]
    group = num_heads // num_kv
    head_elements = head_dim * hidden
    groups_per_chunk = max(1, min(num_kv, _CHUNK_ELEMENTS // (group * head_elements)))
    # A kv group larger than a chunk (8B models: 4 heads x 128 x 4096) is split into chunks of its heads, which
    # share the group's kv product: smaller working sets, fewer trips to memory for the element-wise passes.
    heads_per_chunk = group if groups_per_chunk > 1 else max(1, min(group, _CHUNK_ELEMENTS // head_elements))
    # Reused buffers: fresh multi-MB allocations cost page faults comparable to the math itself.
    buffers = {} if buffers is None else buffers
    shape = (groups_per_chunk * heads_per_chunk, head_dim, hidden)
    kv_shape = (groups_per_chunk, head_dim, hidden)
    fresh = "base" not in buffers or not ops.same_buffer(buffers["base"], shape, wq_b)
    if fresh or buffers.get("matmul_dtype") != matmul_dtype:
        buffers.clear()  # drop old buffers before allocating new ones
        buffers["matmul_dtype"] = matmul_dtype
        for key in ("base", "task"):
            buffers[key] = ops.empty(shape, wq_b)
        for key in ("wq_base", "wq_task"):
            buffers[key] = ops.empty(shape, wq_b, matmul_dtype)
        for key in ("wk", "wv"):
            buffers[key] = ops.empty(kv_shape, wq_b, matmul_dtype)
        if matmul_dtype != "float64":
            for key in ("low_base", "low_task"):
                buffers[key] = ops.empty(shape, wq_b, matmul_dtype)
    grouped_b = wq_b.reshape(num_kv, group, head_dim, hidden)
    grouped_t = wq_t.reshape(num_kv, group, head_dim, hidden)
    out = []
    for g0 in range(0, num_kv, groups_per_chunk):
        g1 = min(num_kv, g0 + groups_per_chunk)
        kv_b = _kv_products(wk_b[g0:g1], wv_b[g0:g1], buffers)
        kv_t = _kv_products(wk_t[g0:g1], wv_t[g0:g1], buffers)
        for h0 in range(0, group, heads_per_chunk):
            h1 = min(group, h0 + heads_per_chunk)
            n = (g1 - g0) * (h1 - h0)

            def half(grouped: Any, kv: Any, key: str, n: int = n, g0: int = g0, g1: int = g1, h0: int = h0) -> Any:
                """One model's float64 logits of the chunk; for "pad" exp'ed in place, with their sums."""
                low = buffers[f"low_{key}"][:n] if matmul_dtype != "float64" else None
                target = buffers[key][:n]
                wq_chunk = grouped[g0:g1, h0 : h0 + n // (g1 - g0)]
                _transposed_logits(wq_chunk, kv, target if low is None else low, buffers[f"wq_{key}"][:n])
                if low is not None:
                    # Widened while shifted by each row's maximum, in one pass: softmax(x) = softmax(x - max x).
                    flat = low.reshape(n, -1)
                    ops.subtract_into(target.reshape(n, -1), flat, ops.max(flat))
                return target, (_exp_shifted_(target, temperature) if metric == "pad" else None)

            if parallel is not None:  # the base half in another thread (numpy and torch release the GIL)
                pending = parallel.submit(half, grouped_b, kv_b, "base")
                logits_t, sum_t = half(grouped_t, kv_t, "task")
                logits_b, sum_b = pending.result()
            else:
                logits_b, sum_b = half(grouped_b, kv_b, "base")
                logits_t, sum_t = half(grouped_t, kv_t, "task")
            if metric == "pad":
                out.append(_pad_from_exp(logits_b, logits_t, sum_b, sum_t))
            else:
                out.append(_transposed_distance(logits_b, logits_t, metric, temperature))
    return ops.concat(out)


def _exp_shifted_(logits: Any, temperature: float) -> Any:
    """e = exp((x - max x) / tau) in place over each of the [n, ...] rows; returns Z = sum(e) [n, 1]."""
    ops = ops_for(logits)
    flat = logits.reshape(logits.shape[0], -1)
    if temperature != 1.0:
        flat /= temperature
    flat -= ops.max(flat)
    ops.exp_(flat)
    return ops.sum(flat)


def _pad_from_exp(e_base: Any, e_task: Any, z_base: Any, z_task: Any) -> Any:
    """ "pad" from the unnormalized softmax of both models' logits held as Wo^T [n, hd, d] (both overwritten).

    D = P_base - P_task = (e_base - e_task * Z_b / Z_t) / Z_b, the 1 / Z_b applied to the final sum: one pass over
    the [n, N] arrays fewer than normalizing both.
    """
    ops = ops_for(e_base)
    n = e_base.shape[0]
    flat_task = e_task.reshape(n, -1)
    flat_task *= z_base / z_task
    # cumsum of the difference, not the difference of two cumsums: the CDFs agree to ~1e-9 and their
    # separate rounding errors (~1e-16 * C) would otherwise swamp small scores.
    e_base -= e_task
    return _cdf_gap_sum(ops.cumsum_(e_base, axis=1), z_base)


def _kv_products(wk: Any, wv: Any, buffers: dict[str, Any]) -> Any:
    """(Wv[g] @ Wk[g]^T) for a chunk of kv groups: [G, hd, hd] in the matmul dtype of `buffers`."""
    ops = ops_for(wk)
    num = wk.shape[0]
    wk_m, wv_m = buffers["wk"][:num], buffers["wv"][:num]
    if wk.dtype == wk_m.dtype:  # already in the matmul dtype (e.g. widened bf16 for float32 products)
        wk_m, wv_m = wk, wv
    else:
        ops.copy_into(wk_m, wk)
        ops.copy_into(wv_m, wv)
    return ops.matmul(wv_m, ops.swap_last(wk_m))


def _transposed_logits(wq: Any, kv: Any, out: Any, wq_scratch: Any) -> Any:
    """Wo[h]^T = (Wk[g] @ Wv[g]^T)^T @ Wq[h] for a chunk of heads, into `out` [n, hd, d] (its dtype is the matmul's).

    Args:
        wq: [G, h, hd, d], h heads of each of G kv groups; kv: [G, hd, hd] from `_kv_products`.
        wq_scratch: a [n, hd, d] buffer of out's dtype for wq's copy when wq is of another dtype.

    The transposed product is a batch of [hd, hd] @ [hd, d] matmuls, several times faster than
    Wq[h]^T @ (Wk Wv^T) with its tall [d, hd] @ [hd, hd] shape; `_transposed_distance` accounts for
    the layout.
    """
    ops = ops_for(out)
    num_kv, heads, head_dim, hidden = wq.shape
    wq_m = wq_scratch.reshape(num_kv, heads, head_dim, hidden)
    if wq.dtype == wq_m.dtype:
        wq_m = wq  # multiplied as it is: already in the matmul dtype (e.g. widened bf16 for float32 products)
    else:
        ops.copy_into(wq_m, wq)
    kv_b = ops.expand(kv[:, None], (num_kv, heads, head_dim, head_dim))
    ops.matmul(kv_b, wq_m, out=out.reshape(num_kv, heads, head_dim, hidden))
    return out


def _transposed_distance(logits_base: Any, logits_task: Any, metric: str, temperature: float) -> Any:
    """`distribution_distance` for logits held as Wo^T, i.e. [n, hd, d] (both are overwritten).

    Only "pad" depends on the order of the N entries: it needs the CDF along row-major Wo [d, hd], whose
    position (i, j) lies at [j, i] here. That CDF is the sum of whole rows before row i plus the partial
    row up to j, computed without transposing back:
        C[i, j] = sum_{i' < i} rowsum[i'] + colcumsum[j, i],  colcumsum = cumsum over the hd axis.
    """
    n = logits_base.shape[0]
    if metric != "pad":
        return distribution_distance(logits_base.reshape(n, -1), logits_task.reshape(n, -1), metric, temperature)
    z_base, z_task = _exp_shifted_(logits_base, temperature), _exp_shifted_(logits_task, temperature)
    return _pad_from_exp(logits_base, logits_task, z_base, z_task)


def _cdf_gap_sum(partial: Any, z_base: Any) -> Any:
    """sum_i |C_base[i] - C_task[i]| / (N - 1) from partial[j, i] = Z_b * sum_{j' <= j} D[i, j'] ([n, hd, d], float64,
    overwritten) and Z_b [n, 1]; see `_transposed_distance`."""
    ops = ops_for(partial)
    n, head_dim, hidden = partial.shape
    row_sums = partial[:, -1, :]
    rows_before = ops.cumsum(row_sums)  # [n, d]
    rows_before -= row_sums  # sum of rows i' < i
    partial += rows_before[:, None, :]
    partial[:, -1, -1] = 0.0  # the last point (i = d-1, j = hd-1) is not part of the sum
    return ops.abs_sum(partial.reshape(n, -1)) / (z_base[:, 0] * (head_dim * hidden - 1))


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


def open_pair(
    base: Any,
    task: Any,
    trust_remote_code: bool = False,
    *,
    fetch: str | None = None,
    base_revision: str | None = None,
    task_revision: str | None = None,
    progress: bool = False,
) -> tuple[WeightSource, WeightSource]:
    """Open both models for streaming and check that their shapes match (before any scoring work).

    `fetch`, the revisions and `progress` are those of `open_weight_source` (hub ids not in the local cache).
    """
    options = dict(trust_remote_code=trust_remote_code, fetch=fetch, progress=progress)
    src_b = open_weight_source(base, revision=base_revision, **options)
    src_t = open_weight_source(task, revision=task_revision, **options)
    check_same_shape(src_b, src_t)
    return src_b, src_t


def _layer_inputs(src: WeightSource, layer: int, device: str, scratch: dict) -> tuple[Any, Any, Any]:
    """One layer's q/k/v in the stored dtype: numpy arrays on CPU (read into `scratch`, reused for every
    layer), torch tensors on `device` otherwise."""
    if device == "cpu":
        return src.layer_arrays(layer, scratch)
    return src.layer_qkv(layer, device=device, dtype=None)


def score_array(
    base: Any,
    task: Any,
    *,
    metric: str = "pad",
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    matmul_dtype: str = "float64",
    layers: list[int] | None = None,
    workspace: dict | None = None,
) -> np.ndarray:
    """`score_heads` as a numpy float64 [L, H] array; on CPU with checkpoint inputs torch is never imported.

    `matmul_dtype`: see `score_layer`. `layers`: score only these layers (the other rows are NaN).
    `workspace`: a dict that keeps the read and scoring buffers for the next call on models of the same shape
    (`localize_heads`' second, float64 pass): on a virtual machine the first touch of their pages costs ~2 ms
    per MB, about 1.4 s for the read buffers of an 8B-shaped pair.
    """
    metric = validate_metric(metric)
    temperature = validate_temperature(temperature)
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {matmul_dtype!r}.")
    dev = resolve_device(device)
    src_b, src_t = open_pair(base, task, trust_remote_code)
    layout = src_b.layout
    scores = np.full((layout.num_layers, layout.num_heads), np.nan, dtype=np.float64)
    layers = range(layout.num_layers) if layers is None else layers
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Scoring heads", unit="layer")
    workspace = {} if workspace is None else workspace
    buffers: dict[str, Any] = workspace.setdefault("buffers", {})
    if dev == "cpu":
        grad_off = contextlib.nullcontext()
    else:
        import torch

        grad_off = torch.no_grad()

    def read(layer: int, slot: dict) -> tuple[Any, Any]:
        # Stored dtype here; score_layer converts chunk by chunk, keeping float64 copies small.
        return _layer_inputs(src_b, layer, dev, slot["base"]), _layer_inputs(src_t, layer, dev, slot["task"])

    # The next layer is read (file reads and bf16 widening, which release the GIL) while this one is scored,
    # into the other of two sets of read buffers.
    slots = workspace.setdefault("slots", [{"base": {}, "task": {}}, {"base": {}, "task": {}}])
    order = list(layers)
    with (
        grad_off,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="alps-read") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="alps-score") as halves,
    ):
        pending = pool.submit(read, order[0], slots[0]) if order else None
        for i, layer in enumerate(layers):
            base_qkv, task_qkv = pending.result()
            if i + 1 < len(order):
                pending = pool.submit(read, order[i + 1], slots[(i + 1) % 2])
            # Base and task halves in two threads on CPU: two single-threaded streams, which (unlike a multi-threaded
            # BLAS, see alps-localize --threads) do not wait on each other inside every product.
            parallel = halves if dev == "cpu" else None
            row = score_layer(base_qkv, task_qkv, metric, temperature, buffers, matmul_dtype, parallel)
            scores[layer] = row if isinstance(row, np.ndarray) else row.cpu().numpy()
            del base_qkv, task_qkv
    return scores


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
    import torch

    scores = score_array(
        base,
        task,
        metric=metric,
        temperature=temperature,
        device=device,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    return torch.from_numpy(scores)
