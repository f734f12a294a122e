"""The few array operations the scoring math needs, for numpy arrays and for torch tensors.

The score is written once against this interface (`alps_trl.localization.scoring`). numpy runs it on CPU without
importing torch; torch runs it on CUDA, or whenever torch tensors are passed in. In-place arithmetic
(``x -= y``), slicing, ``reshape`` and broadcasting with ``None`` behave the same in both libraries
and are used directly; only what differs in name or signature lives here. Every reduction works on
the last axis and keeps it (size 1) unless its name says otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    """float64 numpy arrays on CPU."""

    name = "numpy"

    @staticmethod
    def empty(shape: tuple[int, ...], like: Any, dtype: str = "float64") -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def same_buffer(buf: Any, shape: tuple[int, ...], like: Any) -> bool:
        """True if `buf` can be reused as float64 scratch of `shape` for arrays like `like`."""
        return isinstance(buf, np.ndarray) and buf.shape == shape

    @staticmethod
    def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    @staticmethod
    def swap_last(x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(a, b, out=out)

    @staticmethod
    def expand(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(x, shape)

    @staticmethod
    def max(x: np.ndarray) -> np.ndarray:
        return x.max(axis=-1, keepdims=True)

    @staticmethod
    def subtract_into(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """out = a - b, with `out` of a wider dtype than `a` (the widening costs no extra pass)."""
        np.subtract(a, b, out=out)

    @staticmethod
    def sum(x: np.ndarray, keepdim: bool = True) -> np.ndarray:
        return x.sum(axis=-1, keepdims=keepdim)

    @staticmethod
    def exp_(x: np.ndarray) -> np.ndarray:
        return np.exp(x, out=x)

    @staticmethod
    def log(x: np.ndarray) -> np.ndarray:
        return np.log(x)

    @staticmethod
    def exp(x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    @staticmethod
    def cumsum_(x: np.ndarray, axis: int) -> np.ndarray:
        """In-place running sum along `axis` (sequential: the same additions in the same order as torch)."""
        # Row additions: on CPU several times faster than a cumsum along a non-last axis.
        moved = np.moveaxis(x, axis, 0)
        for j in range(1, moved.shape[0]):
            np.add(moved[j], moved[j - 1], out=moved[j])
        return x

    @staticmethod
    def cumsum(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=-1)

    @staticmethod
    def abs_sum(x: np.ndarray) -> np.ndarray:
        """sum |x| over the last axis (drops it); `x` is overwritten."""
        return np.abs(x, out=x).sum(axis=-1)

    @staticmethod
    def norm(x: np.ndarray, keepdim: bool = False) -> np.ndarray:
        """Euclidean norm over the last axis."""
        n = np.sqrt(np.einsum("...i,...i->...", x, x))
        return n[..., None] if keepdim else n

    @staticmethod
    def relative_entropy_sum(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        """sum p * log(p / m) over the last axis (drops it), with terms where p == 0 exactly 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = p * np.log(p / m)
        terms[p == 0] = 0.0
        return terms.sum(axis=-1)

    @staticmethod
    def clamp_min_(x: np.ndarray, low: float) -> np.ndarray:
        return np.maximum(x, low, out=x)

    @staticmethod
    def concat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)


class TorchOps:
    """torch tensors on any device (CUDA for speed; CPU when a caller passes torch tensors)."""

    name = "torch"

    @staticmethod
    def empty(shape: tuple[int, ...], like: Any, dtype: str = "float64") -> Any:
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)

    @staticmethod
    def same_buffer(buf: Any, shape: tuple[int, ...], like: Any) -> bool:
        return not isinstance(buf, np.ndarray) and tuple(buf.shape) == shape and buf.device == like.device

    @staticmethod
    def copy_into(dst: Any, src: Any) -> None:
        dst.copy_(src)

    @staticmethod
    def swap_last(x: Any) -> Any:
        return x.transpose(-1, -2)

    @staticmethod
    def matmul(a: Any, b: Any, out: Any = None) -> Any:
        import torch

        if out is None:
            return torch.matmul(a, b)
        return torch.matmul(a, b, out=out)

    @staticmethod
    def expand(x: Any, shape: tuple[int, ...]) -> Any:
        return x.expand(shape)

    @staticmethod
    def max(x: Any) -> Any:
        return x.amax(dim=-1, keepdim=True)

    @staticmethod
    def subtract_into(out: Any, a: Any, b: Any) -> None:
        import torch

        torch.sub(a, b, out=out)

    @staticmethod
    def sum(x: Any, keepdim: bool = True) -> Any:
        return x.sum(dim=-1, keepdim=keepdim)

    @staticmethod
    def exp_(x: Any) -> Any:
        return x.exp_()

    @staticmethod
    def log(x: Any) -> Any:
        return x.log()

    @staticmethod
    def exp(x: Any) -> Any:
        return x.exp()

    @staticmethod
    def cumsum_(x: Any, axis: int) -> Any:
        return x.cumsum_(dim=axis)

    @staticmethod
    def cumsum(x: Any) -> Any:
        return x.cumsum(dim=-1)

    @staticmethod
    def abs_sum(x: Any) -> Any:
        return x.abs_().sum(dim=-1)

    @staticmethod
    def norm(x: Any, keepdim: bool = False) -> Any:
        import torch

        return torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim)

    @staticmethod
    def relative_entropy_sum(p: Any, m: Any) -> Any:
        import torch

        # xlogy(p, p / m): exactly 0 where p == 0, also where p and m both underflow to 0.
        return torch.special.xlogy(p, p / m).sum(dim=-1)

    @staticmethod
    def clamp_min_(x: Any, low: float) -> Any:
        return x.clamp_min_(low)

    @staticmethod
    def concat(parts: list[Any]) -> Any:
        import torch

        return torch.cat(parts)


def ops_for(x: Any) -> type[NumpyOps] | type[TorchOps]:
    """The operations for `x`'s library: numpy for numpy arrays, torch for anything else (tensors)."""
    return NumpyOps if isinstance(x, np.ndarray) else TorchOps
