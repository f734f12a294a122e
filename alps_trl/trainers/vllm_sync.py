"""What TRL pushes to vLLM after each step, under ALPS: the weights the policy computes with.

TRL's `VLLMGeneration.sync_weights` (colocate and server mode) reads the policy's parameters one by one
(`_iter_named_params`, gathering FSDP/ZeRO-3 shards) and loads them into vLLM by name. In delta mode those
parameters are the frozen base q/k/v plus ``...q_proj.alps_delta.*`` tensors vLLM has no slot for, so vLLM would
generate with the untrained base and reject the delta names. `push_effective_weights` wraps the iterator of one
`VLLMGeneration`: the delta tensors are left out and every q/k/v weight (and bias) that carries a delta is pushed
as base + delta, summed in float32 and cast back, exactly as `merge` and saving compute it. Mask mode trains the
real weights: nothing to change.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from alps_trl.restriction.base import DELTA_MARKER
from alps_trl.restriction.delta_checkpoint import apply_delta, split_delta_state_dict


def push_effective_weights(generation: Any, trainer: Any) -> None:
    """Make `generation` (TRL's `VLLMGeneration`) push base + delta for the restricted q/k/v of `trainer`'s policy.

    The deltas are gathered once per push (a collective under FSDP2/ZeRO-3; TRL iterates on every process).
    """
    original = generation._iter_named_params

    def effective() -> Iterator[tuple[str, torch.Tensor]]:
        restriction = trainer.restriction
        if restriction is None or restriction.mode != "delta":
            yield from original()
            return
        parsed = split_delta_state_dict(restriction.delta_state_dict(trainer.model))
        by_vllm_name = {generation._fix_param_name_to_vllm(name): entry for name, entry in parsed.items()}
        for name, tensor in original():
            if DELTA_MARKER in name:
                continue
            entry = by_vllm_name.get(name)
            if entry is not None:
                delta, index, dim = entry
                tensor = apply_delta(tensor, delta.to(tensor.device), index, dim)
            yield name, tensor

    generation._iter_named_params = effective
