"""Helpers for the localization tests: planted perturbations and an independent brute-force score.

The brute force reads the projection modules directly (not through `AttentionLayout` or the weight
readers) and loops over heads with numpy and scipy, so it shares no code with the implementation.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import wasserstein_distance


def attn_modules(model: torch.nn.Module, layer: int):
    return model.model.layers[layer].self_attn


def qkv_numpy(model: torch.nn.Module, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 q, k, v weights [rows, d] of one layer, read from the modules (fused qkv split by hand)."""
    attn = attn_modules(model, layer)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if hasattr(attn, "qkv_proj"):
        w = attn.qkv_proj.weight.detach().double().numpy()
        q_rows = cfg.num_attention_heads * hd
        kv_rows = cfg.num_key_value_heads * hd
        return w[:q_rows], w[q_rows : q_rows + kv_rows], w[q_rows + kv_rows :]
    return tuple(getattr(attn, n).weight.detach().double().numpy() for n in ("q_proj", "k_proj", "v_proj"))


def head_distribution(model: torch.nn.Module, layer: int, head: int, temperature: float = 1.0) -> np.ndarray:
    """softmax(flatten(Wq[h]^T @ Wk[g] @ Wv[g]^T) / tau) with numpy, one head at a time."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    wq, wk, wv = qkv_numpy(model, layer)
    g = head // (heads // kv)
    q = wq[head * hd : (head + 1) * hd]
    k = wk[g * hd : (g + 1) * hd]
    v = wv[g * hd : (g + 1) * hd]
    x = (q.T @ (k @ v.T)).flatten() / temperature
    p = np.exp(x - x.max())
    return p / p.sum()


def brute_force_scores(base, task, metric: str = "pad", temperature: float = 1.0) -> np.ndarray:
    """Per-head loops: scipy W1 on linspace(0, 1, N) for "pad", textbook formulas for the others."""
    cfg = base.config
    out = np.zeros((cfg.num_hidden_layers, cfg.num_attention_heads))
    for layer in range(cfg.num_hidden_layers):
        for head in range(cfg.num_attention_heads):
            pb = head_distribution(base, layer, head, temperature)
            pt = head_distribution(task, layer, head, temperature)
            if metric == "pad":
                x = np.linspace(0.0, 1.0, pb.size)
                out[layer, head] = wasserstein_distance(x, x, pb, pt)
            elif metric == "kl":
                out[layer, head] = float(np.sum(pb * np.log(pb / pt)))
            elif metric == "js":
                m = 0.5 * (pb + pt)
                out[layer, head] = 0.5 * np.sum(pb * np.log(pb / m)) + 0.5 * np.sum(pt * np.log(pt / m))
            elif metric == "cosine":
                out[layer, head] = 1.0 - pb @ pt / (np.linalg.norm(pb) * np.linalg.norm(pt))
            elif metric == "euclidean":
                out[layer, head] = np.linalg.norm(pb - pt)
            else:
                raise ValueError(metric)
    return out


def _rows(model: torch.nn.Module, layer: int, which: str) -> tuple[torch.Tensor, int]:
    """(weight, row offset) of the q, k or v block of `layer` (fused qkv: the block's offset)."""
    attn = attn_modules(model, layer)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if hasattr(attn, "qkv_proj"):
        q_rows = cfg.num_attention_heads * hd
        kv_rows = cfg.num_key_value_heads * hd
        offset = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[which]
        return attn.qkv_proj.weight, offset
    return getattr(attn, f"{which}_proj").weight, 0


@torch.no_grad()
def perturb_query_heads(model: torch.nn.Module, heads, scale: float = 0.05, seed: int = 1) -> None:
    """Add noise to the Wq rows of the given (layer, head) pairs, in place."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer, head in heads:
        w, off = _rows(model, layer, "q")
        block = w[off + head * hd : off + (head + 1) * hd]
        block += scale * torch.randn(block.shape, generator=gen).to(w.dtype)


@torch.no_grad()
def perturb_kv_group(model: torch.nn.Module, layer: int, group: int, which: str = "k", scale=0.05, seed=2) -> None:
    """Add noise to the k (or v) rows of one kv group, in place."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w, off = _rows(model, layer, which)
    block = w[off + group * hd : off + (group + 1) * hd]
    block += scale * torch.randn(block.shape, generator=gen).to(w.dtype)


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
