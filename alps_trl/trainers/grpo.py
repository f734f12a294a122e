"""`AlpsGRPOTrainer`: TRL's `GRPOTrainer` (RL with verifiable rewards) training only the localized heads' q/k/v.

The reference model (``beta > 0``) never comes from reloading ``model.config._name_or_path`` (TRL's way, which fails
for a model built in memory and loads a model from disk twice):

- "parameter-free" when only the selected heads train (``alps_train_non_attention=False``), in delta mode on any
  backend and in mask mode without FSDP/DeepSpeed: the policy itself inside `Restriction.reference` (deltas off,
  or the original rows swapped in), like PEFT's disabled adapter. No copy, no memory.
- "copy" otherwise: a frozen in-memory copy of the policy as it was at the start, prepared for the backend as TRL
  prepares its own reference (DeepSpeed, FSDP, or evaluation mode).

Localization: a heads file, a task model, importance or the probe. GRPO's own loss needs generations, so the probe
and importance scoring train on the prompts' reference answers (a dataset column such as "answer" or "solution",
cross-entropy on the answer tokens) and are refused, before any work, when the dataset has none.

With ``use_vllm``, the weights pushed to vLLM after each step are the effective ones (base + delta in delta mode;
`alps_trl.trainers.vllm_sync`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.restriction import resolve_mode
from alps_trl.trainers.config import alps_arguments_of
from alps_trl.trainers.mixin import ALPS_PAPER, AlpsTrainerMixin
from alps_trl.trainers.private_api import refresh_trl_forward_patches
from alps_trl.trainers.reference import AlpsReferenceModel
from alps_trl.trainers.vllm_sync import push_effective_weights

logger = logging.get_logger(__name__)

# Dataset columns that hold a prompt's reference answer (what the probe and importance scoring train on).
ANSWER_COLUMNS = ("completion", "answer", "solution", "ground_truth", "reference", "target")
REFERENCE_KINDS = {
    "none": "beta = 0: no reference model",
    "parameter-free": "the policy with the ALPS update switched off, no copy",
    "copy": "a frozen in-memory copy of the policy at the start",
}


class AlpsGRPOTrainer(AlpsTrainerMixin, GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same arguments, plus ``head_selection=``).

    ``trainer.reference_kind`` says which reference is in use (see the module docstring).
    """

    _tag_names = [*GRPOTrainer._tag_names, "alps"]
    _name = "GRPO with ALPS"
    _paper = ALPS_PAPER

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = GRPOConfig(f"{name.split('/')[-1]}-GRPO")
        if getattr(args, "sync_ref_model", False) and args.beta:
            raise ValueError(
                "sync_ref_model=True moves the reference toward the policy; AlpsGRPOTrainer keeps its reference "
                "fixed (the policy before training). Set sync_ref_model=False."
            )
        # TRL would build the reference by reloading the model by name; ALPS builds its own right after.
        self._alps_beta = float(args.beta)
        args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *rest, **kwargs)
        finally:
            args.beta = self._alps_beta

    def _alps_after_trl_init(self) -> None:
        self.beta = self._alps_beta
        self.reference_kind = "none"
        if self.beta:
            self.ref_model = self._alps_reference()
        if self.accelerator.is_main_process:
            logger.warning(f"ALPS GRPO reference: {self.reference_kind} ({REFERENCE_KINDS[self.reference_kind]}).")
        generation = getattr(self, "vllm_generation", None)
        if generation is not None:
            push_effective_weights(generation, self)

    def _alps_reference(self) -> torch.nn.Module:
        from trl.models.utils import prepare_deepspeed, prepare_fsdp
        from trl.trainer.utils import disable_dropout_in_model

        alps, policy = alps_arguments_of(self.args), unwrap_model(self.model)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        mode = resolve_mode(alps.alps_mode, policy)
        if not alps.alps_train_non_attention and (mode == "delta" or not sharded):
            self.reference_kind = "parameter-free"
            reference = AlpsReferenceModel(policy)
            reference.set_context(lambda: self.restriction.reference(self.model))
            return reference
        self.reference_kind = "copy"
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        refresh_trl_forward_patches(
            reference, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
        )
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    # ---- the probe's and importance's data: prompts with their reference answers -----------------------------
    def _alps_answer_column(self) -> str | None:
        columns = getattr(self.train_dataset, "column_names", None) or []
        return next((c for c in ANSWER_COLUMNS if c in columns), None)

    def _alps_check_probe_possible(self, model: torch.nn.Module) -> None:
        self._alps_require_answers("the probe")
        super()._alps_check_probe_possible(model)

    def _alps_check_importance_possible(self) -> None:
        self._alps_require_answers("alps_metric='importance'")
        super()._alps_check_importance_possible()

    def _alps_require_answers(self, what: str) -> None:
        if self._alps_answer_column() is None:
            raise ValueError(
                f"ALPS has no loss for {what} under GRPO: the training data has no reference answers (a column "
                f"named one of {', '.join(ANSWER_COLUMNS)}). Add one, or pass alps_heads (a saved selection, e.g. "
                "from an SFT run on the same task), alps_task_model (a fine-tune of the same base), or "
                "alps_strategy='random'."
            )

    def _alps_probe_dataloader(self) -> torch.utils.data.DataLoader:
        """Batches of prompt + reference answer, tokenized (answer tokens labelled), in one seeded order."""
        column = self._alps_answer_column()
        tokenizer = self.processing_class
        rows = [self._alps_probe_example(row["prompt"], row[column]) for row in self.train_dataset]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def collate(examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
            width = max(len(ids) for ids, _ in examples)
            input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
            labels = torch.full((len(examples), width), -100, dtype=torch.long)
            attention = torch.zeros((len(examples), width), dtype=torch.long)
            for i, (ids, prompt_len) in enumerate(examples):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
                attention[i, : len(ids)] = 1
            return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

        generator = torch.Generator().manual_seed(int(self.args.seed))
        return torch.utils.data.DataLoader(
            rows,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate,
        )

    def _alps_probe_example(self, prompt: Any, answer: Any) -> tuple[list[int], int]:
        """(token ids of prompt + answer + eos, number of prompt tokens); chat prompts through the chat template."""
        tokenizer = self.processing_class
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = str(prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(answer), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return prompt_ids + answer_ids + eos, len(prompt_ids)

    def _alps_probe_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the reference answers (the forward without TRL's fused LM head returns it)."""
        device = self.accelerator.device
        inputs = {k: v.to(device) for k, v in batch.items()}
        with self.compute_loss_context_manager():
            return model(**inputs).loss
