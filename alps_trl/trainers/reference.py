"""A parameter-free DPO reference model: the policy itself, computing as the base model.

DPO needs log-probabilities under the reference (the model before training). When only the selected
heads' q/k/v rows train (``alps_train_non_attention=False``), the base is recoverable from the policy
at no memory cost: `Restriction.reference` swaps the original rows in (mask mode) or switches the
deltas off (delta mode). `AlpsReferenceModel` wraps that in a module DPOTrainer can call like any
``ref_model``; it owns no parameters and holds the policy outside its module tree, so it adds no
copy, no optimizer state and nothing to checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class AlpsReferenceModel(nn.Module):
    """Runs `policy` under ``torch.no_grad()`` inside `context()`.

    Args:
        policy: the (unwrapped) model being trained.
        context: zero-argument callable returning a context manager in which `policy` computes as
            the reference (e.g. ``lambda: restriction.reference(policy)``). It can be replaced later
            through `set_context` (the trainer installs the restriction after TRL built the trainer).
    """

    def __init__(self, policy: nn.Module, context: Callable[[], contextlib.AbstractContextManager] | None = None):
        super().__init__()
        # Stored outside _modules: the policy's parameters must not appear in this module's tree.
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_context", context)

    @property
    def policy(self) -> nn.Module:
        return self._policy

    @property
    def config(self) -> Any:
        """The policy's config (TRL reads it from every reference model)."""
        return self._policy.config

    def set_context(self, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        object.__setattr__(self, "_context", context)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._context is None:
            raise RuntimeError(
                "The ALPS reference model has no restriction yet: the trainer installs it when training starts."
            )
        with torch.no_grad(), self._context():
            return self._policy(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"policy={type(self._policy).__name__}, parameters=0"
