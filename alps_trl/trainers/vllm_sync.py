"""What TRL pushes to vLLM after each step, under ALPS: the weights the policy computes with, and only those that
can have changed.

TRL's `VLLMGeneration.sync_weights` (colocate and server mode) reads the policy's parameters one by one
(`_iter_named_params`, gathering FSDP/ZeRO-3 shards) and loads them into vLLM by name. In delta mode those
parameters are the frozen base q/k/v plus ``...q_proj.alps_delta.*`` tensors vLLM has no slot for, so vLLM would
generate with the untrained base and reject the delta names. `push_effective_weights` wraps the iterator of one
`VLLMGeneration`: the delta tensors are left out and every q/k/v weight (and bias) that carries a delta is pushed
as base + delta, summed in float32 and cast back, exactly as `merge` and saving compute it. Mask mode trains the
real weights: nothing to change there.

Only what changed: when nothing outside the restricted q/k/v (and o_proj) tensors trains (head-only training,
``alps_train_non_attention=False``, or a quantized base), a push after the first one sends only the restricted
tensors that have a selected row, base + delta; vLLM keeps the rest from the previous push. With the rest of the
network training, every push sends everything, as TRL does.

The first push is always complete. TRL syncs before the first generation (``_last_loaded_step`` starts at -1, so
step 0 pushes too), and at that point vLLM may hold other weights than the policy: a ``trl vllm-serve`` server
outlives a training run and keeps the weights an earlier run pushed; the server or colocated engine loaded the
model by name, while the trainer may hold a model changed in memory (or converted from GGUF). A full first push
makes vLLM hold exactly the policy; from then on only the restricted tensors can move. Colocate mode with
``vllm_enable_sleep_mode`` pushes everything every time: sleep level 2 discards vLLM's weights between steps.
Under FSDP/ZeRO-3 a partial push still walks (gathers) every parameter, as TRL's iterator does, and sends only
the changed ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.restriction.base import DELTA_MARKER
from alps_trl.restriction.delta_checkpoint import apply_delta, split_delta_state_dict


def changed_parameter_names(restriction: Any, model: torch.nn.Module) -> set[str] | None:
    """Names (``named_parameters`` of the unwrapped model) of the weights that training can change, or None when
    anything outside the restricted tensors trains (then every weight can change).

    Restricted tensors count when they have a selected row; delta parameters count as the base tensor they
    add to.
    """
    if restriction is None:
        return None
    restricted = {t.name for t in restriction.targets if t.num_selected > 0}
    trainable = {n for n, p in unwrap_model(model).named_parameters() if p.requires_grad and DELTA_MARKER not in n}
    if not trainable <= restricted:
        return None
    return restricted


def push_effective_weights(generation: Any, trainer: Any) -> None:
    """Make `generation` (TRL's `VLLMGeneration`) push base + delta for the restricted q/k/v of `trainer`'s policy,
    and after a complete first push only the tensors that can have changed (see the module docstring).

    The deltas are gathered once per push (a collective under FSDP2/ZeRO-3; TRL iterates on every process).
    """
    original_iter = generation._iter_named_params
    original_sync = generation.sync_weights
    state: dict[str, Any] = {"pushed": False, "only": None, "full_metadata": None}

    def effective() -> Iterator[tuple[str, torch.Tensor]]:
        restriction = trainer.restriction
        only = state["only"]
        parsed = {}
        if restriction is not None and restriction.mode == "delta":
            parsed = split_delta_state_dict(restriction.delta_state_dict(trainer.model))
        by_vllm_name = {generation._fix_param_name_to_vllm(name): entry for name, entry in parsed.items()}
        for name, tensor in original_iter():
            if DELTA_MARKER in name or (only is not None and name not in only):
                continue
            entry = by_vllm_name.get(name)
            if entry is not None:
                delta, index, dim = entry
                tensor = apply_delta(tensor, delta.to(tensor.device), index, dim)
            yield name, tensor

    def sync() -> None:
        changed = changed_parameter_names(trainer.restriction, trainer.model)
        reloads_all = generation.mode == "colocate" and generation.enable_sleep_mode
        partial = state["pushed"] and changed is not None and not reloads_all
        state["only"] = {generation._fix_param_name_to_vllm(n) for n in changed} if partial else None
        if generation.mode == "server":
            # TRL announces the tensors of a push from metadata it collects once; a partial push announces its own.
            full = state["full_metadata"]
            generation._weight_metadata = [m for m in full if m[0] in state["only"]] if partial else full
        try:
            original_sync()
        finally:
            state["only"] = None
        if generation.mode == "server" and not partial:
            state["full_metadata"] = generation._weight_metadata
        state["pushed"] = True

    generation._iter_named_params = effective
    generation.sync_weights = sync
