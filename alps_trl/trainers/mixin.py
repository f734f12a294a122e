"""`AlpsTrainerMixin`: turns a TRL trainer into an ALPS trainer.

Layer 5. Put it first in the bases (``class AlpsSFTTrainer(AlpsTrainerMixin, SFTTrainer)``).

Construction order (``AlpsSFTTrainer(...)``, the same for DPO and GRPO):

1. the trainer class's own ``__init__`` (DPO: chooses the reference, `dpo.choose_reference`; GRPO: keeps TRL from
   loading a reference model), which calls
2. ``AlpsTrainerMixin.__init__``: binds the arguments by TRL's signature, checks the ALPS options against the model
   before TRL builds anything it does not have to, and sets every piece of state ALPS adds (`_alps_init_state`);
3. TRL's constructor (a quantized base is accepted: ALPS adds trainable deltas to it);
4. ``_alps_after_trl_init``, the trainer class's hook (DPO/GRPO put their reference in place);
5. the preflight: the checks that need the built model, then the `check` of the run's head source (the first entry
   of `head_sources.HEAD_SOURCES` that applies), all before any work;
6. localization, once, at the end of the constructor: a checkpoint named by ``args.resume_from_checkpoint`` gives
   its saved selection, else the source's `select` runs (every rank constructs the trainer, so every rank takes
   part in the same collectives: the main process computes, importance and the probe split batches across
   processes, the result is broadcast and every rank verifies its fingerprint). ``train(resume_from_checkpoint=)``
   swaps in a checkpoint's selection as long as nothing has trained yet. `head_selection` and `head_source` are
   plain attributes afterwards.

The `Restriction` is installed on the unwrapped model right away (``requires_grad`` counts are the real ones after
construction), attached after ``accelerator.prepare`` (``on_train_begin``); frozen gradient rows are zeroed after
backward and before clipping (`training_step`), restricted q/k/v stay out of the optimizer's decay group
(`get_decay_parameter_names`) and their decay is applied to selected rows only right before each optimizer step
(``on_pre_optimizer_step``, after clipping). Saves are standard checkpoints (delta mode: deltas merged into a copy of
the state dict) plus ``alps_heads.json``/``.png``; for a quantized base the small delta file and an ``alps-merge``
hint (`alps_trl.trainers.checkpoints`); resuming and ``load_best_model_at_end`` restore deltas over the original base.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Any

import torch
import transformers
from transformers import TrainerCallback
from transformers.utils import logging

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
from alps_trl.localization.gguf import strip_gguf_quantizer
from alps_trl.localization.selection import HeadSelection
from alps_trl.reporting import summary as report
from alps_trl.restriction import build_restriction, is_quantized, resolve_mode
from alps_trl.restriction.delta import merge_state_dict
from alps_trl.restriction.peft_export import NON_ATTENTION_MESSAGE
from alps_trl.trainers import checkpoints
from alps_trl.trainers import head_sources as sources
from alps_trl.trainers import probe as probe_module
from alps_trl.trainers.checkpoints import ADAPTER_DIR, DELTA_FILE, MERGE_HINT_FILE  # noqa: F401 - re-exported
from alps_trl.trainers.checks import (
    PEFT_MESSAGE,
    accept_quantized_base,
    model_init_kwargs,
    refuse_before_init,
    refuse_deepspeed_mask,
    refuse_fsdp1,
    refuse_mask_optimizer,
)
from alps_trl.trainers.config import AlpsArguments, alps_arguments_of, planned_importance_batches, planned_probe_steps

logger = logging.get_logger(__name__)

# resume_from_checkpoint strings that mean "the newest complete checkpoint of output_dir" (as True does).
LATEST = ("true", "last")

ALPS_PAPER = {
    "title": "ALPS: Attention Localization and Pruning Strategy for Efficient Alignment of Large Language Models",
    "id": "2505.18799",
    # docstyle-ignore
    "citation": (
        "@inproceedings{chen2025alps,\n"
        "    title        = {{ALPS: Attention Localization and Pruning Strategy for Efficient Alignment of Large "
        "Language Models}},\n"
        "    author       = {Hao Chen and Haoze Li and Zhiqing Xiao and Lirong Gao and Qi Zhang and Xiaomeng Hu and "
        "Ningtao Wang and Xing Fu and Junbo Zhao},\n"
        "    year         = 2025,\n"
        "    booktitle    = {Findings of the Association for Computational Linguistics: ACL 2025},\n"
        "    eprint       = {2505.18799},\n"
        "    archivePrefix = {arXiv},\n"
        "}"
    ),
}


class AlpsTrainerMixin:
    """ALPS behaviour for a TRL trainer; see the module docstring. Adds ``head_selection=`` to the constructor."""

    def __init__(self, *args: Any, head_selection: HeadSelection | None = None, **kwargs: Any) -> None:
        bound = self._alps_bind(args, kwargs)
        targs = bound.get("args")
        alps = alps_arguments_of(targs) if targs is not None else AlpsArguments()
        self._alps_init_state(alps, head_selection)
        model = bound.get("model")
        if isinstance(model, torch.nn.Module) and strip_gguf_quantizer(model):
            # Loaded with gguf_file=: its weights are dequantized nn.Linear weights, a full-precision model.
            logger.info("ALPS: the model was loaded from a GGUF file; it trains as the full-precision model it is.")
        refuse_before_init(model, targs, bound.get("peft_config"), alps)
        if isinstance(model, torch.nn.Module) and is_quantized(model):
            # TRL casts every trainable parameter of a quantized model to bf16 (meant for LoRA weights). Nothing of
            # a quantized base trains under ALPS, so freeze it first and keep its embeddings/norms untouched.
            unwrap_model(model).requires_grad_(False)
        elif isinstance(model, str) and (
            kwargs.get("quantization_config") or model_init_kwargs(targs).get("quantization_config")
        ):
            logger.warning(
                "ALPS: TRL casts the trainable parameters of a quantized model it loads itself to bf16, including "
                "the embeddings and norms that ALPS keeps frozen. Load the 4-bit model yourself and pass the instance."
            )
        with accept_quantized_base():
            super().__init__(*args, **kwargs)
        self._alps_after_trl_init()
        self._alps = alps_arguments_of(self.args)  # TRL may have built the args (args=None)
        self._alps_head_source = sources.head_source_for(self._alps, head_selection is not None)
        self._alps_preflight()
        self.add_callback(AlpsCallback(self))
        self.localize()

    def _alps_init_state(self, alps: AlpsArguments, head_selection: HeadSelection | None) -> None:
        """Every attribute ALPS adds to the trainer, set once, before TRL's constructor runs."""
        self._alps = alps  # the alps_* options (re-read from the final args after TRL's constructor)
        self._alps_explicit = head_selection  # the head_selection= argument
        self._alps_head_source: sources.HeadSource | None = None  # the run's entry of HEAD_SOURCES
        self._alps_heads_file: HeadSelection | None = None  # alps_heads, read by the preflight
        self._alps_task_source = None  # alps_task_model's WeightSource, opened by the preflight (main process)
        self._alps_mode: str | None = None  # "mask" | "delta", resolved by the preflight
        self._alps_layout: AttentionLayout | None = None  # the model's heads, read by the preflight
        self._alps_selection: HeadSelection | None = None  # the heads that train
        self._alps_source: str | None = None  # the name of the source used, or "checkpoint"
        self._alps_restriction = None  # the installed Restriction
        self._alps_summary: dict[str, Any] | None = None  # the startup summary's counts
        self._alps_probe_reference = None  # inside the probe/importance pass: the DPO reference context
        self._alps_gathered_deltas: dict[str, torch.Tensor] | None = None  # deltas gathered for the save in flight
        # Filled by the DPO and GRPO constructors before they call this one, so kept when already set (None for SFT):
        self._alps_reference_module = vars(self).get("_alps_reference_module")  # DPO: the parameter-free reference
        self._alps_beta: float | None = vars(self).get("_alps_beta")  # GRPO: args.beta, hidden from TRL's constructor

    # ---- public -------------------------------------------------------------------------------
    @property
    def head_selection(self) -> HeadSelection:
        """The heads that train (set by the constructor; reading it starts no computation or collective)."""
        return self._alps_selection

    @property
    def head_source(self) -> str | None:
        """Where `head_selection` came from: an entry of `head_sources.HEAD_SOURCES` by name ("argument",
        "alps_heads", "alps_task_model", "random", "layer_consistent", "importance", "probe") or "checkpoint"."""
        return self._alps_source

    @property
    def restriction(self):
        """The installed `Restriction` (mask or delta)."""
        return self._alps_restriction

    @property
    def attention_layout(self) -> AttentionLayout | None:
        """The model's attention heads as ALPS reads them (layers, heads, q/k/v tensor names); set by the
        constructor's checks."""
        return self._alps_layout

    @property
    def alps_summary(self) -> dict[str, Any] | None:
        """The startup summary's counts (`Restriction.summary` once the restriction is installed: heads selected,
        trainable q/k/v parameters, ...), as logged to the trackers; None before localization."""
        return self._alps_summary

    def localize(self, resume_from_checkpoint: str | bool | None = None) -> HeadSelection:
        """Localize heads and install the restriction; a no-op once done. The constructor calls it (with
        ``args.resume_from_checkpoint``); `train` repeats the step for its own ``resume_from_checkpoint``.

        Every process must call it: the probe, importance scoring and the broadcast are collectives.
        """
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        self._alps_setup(self._alps_resolve_checkpoint(resume_from_checkpoint, strict=False))
        return self._alps_selection

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, resuming only from a complete checkpoint: ``True`` (or ``"true"``/``"last"``) means the
        newest complete ``checkpoint-N`` of ``output_dir``, and a named checkpoint whose save was interrupted gives
        way to the newest complete one before it (`checkpoints.checkpoint_problem` says how that is told)."""
        checkpoint = self._alps_resolve_checkpoint(resume_from_checkpoint)
        self._alps_setup(checkpoint)
        if checkpoint is not None:
            self._alps_set_aside_incomplete(checkpoint)
            resume_from_checkpoint = checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- transformers.Trainer overrides -------------------------------------------------------
    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Transformers' decay names minus the restricted q/k/v, whose decay the restriction applies itself."""
        names = super().get_decay_parameter_names(model)
        if self._alps_restriction is None:
            return names
        exempt = self._alps_restriction.decay_exempt_parameter_names(model)
        exempt_ids = {id(p) for n, p in unwrap_model(model).named_parameters() if n in exempt}
        keep = set(names)
        return [n for n, p in model.named_parameters() if n in keep and id(p) not in exempt_ids]

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # After backward (and the DDP all-reduce on the sync step), before Trainer clips the gradients.
        if self._alps_restriction is not None and self.accelerator.sync_gradients:
            self._alps_restriction.mask_gradients(model)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP with SHARDED_STATE_DICT, Trainer writes no model files on a final save (checkpoints keep the
        shards); gather a full state dict instead so output_dir holds a standard checkpoint."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        # Every rank calls save_model (checkpoints too); `_save` may run on the writer alone. Gather the deltas
        # here, where a collective is safe, and let `_save` write them.
        restriction = self._alps_restriction
        if restriction is not None and restriction.mode == "delta":
            self._alps_gathered_deltas = restriction.delta_state_dict(self.model)
        # The final save (not a checkpoint's) also writes the adapter; gathering is a collective, so here too.
        adapter_deltas = None
        if restriction is not None and self._alps.alps_save_adapter and not _internal_call:
            adapter_deltas = self._alps_gathered_deltas or restriction.trained_deltas(self.model)
        try:
            if plugin is None or _internal_call or "FULL_STATE_DICT" in str(plugin.state_dict_type):
                super().save_model(output_dir, _internal_call)
            else:
                previous = plugin.state_dict_type
                plugin.set_state_dict_type("FULL_STATE_DICT")
                try:
                    super().save_model(output_dir, _internal_call)
                finally:
                    plugin.set_state_dict_type(previous)
        finally:
            self._alps_gathered_deltas = None
        # Sharded checkpoints never reach _save: write the selection here too, so that resuming restores it.
        if self.args.should_save and self._alps_selection is not None:
            self._alps_write_selection(output_dir if output_dir is not None else self.args.output_dir)
        if adapter_deltas is not None and self.args.should_save:
            directory = os.path.join(output_dir if output_dir is not None else self.args.output_dir, ADAPTER_DIR)
            checkpoints.write_adapter(
                self.model, restriction, adapter_deltas, directory, self._alps.alps_adapter_uniform_rank
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        restriction = self._alps_restriction
        if restriction is not None and restriction.mode == "delta":
            deltas = self._alps_gathered_deltas
            if deltas is None:  # called outside save_model: as Trainer does it, on every rank (a collective)
                deltas = restriction.delta_state_dict(self.model)
            if not self.args.should_save:
                # FSDP2's full state dict is empty on non-writer ranks: nothing to merge, nothing to write.
                super()._save(output_dir, state_dict=state_dict)
            elif is_quantized(self.model):
                checkpoints.save_quantized_run(
                    output_dir, self.model, restriction, deltas, self.processing_class, self.args
                )
            else:
                full = state_dict if state_dict is not None else self.model.state_dict()
                # Trainer's placeholder save ({}: ZeRO-3 without 16-bit gathering, FSDP writers without a full
                # state dict) has nothing to merge into; the deltas go to their own file beside it either way.
                merged = merge_state_dict(full, deltas) if full else full

                def save(directory: str) -> None:
                    super(AlpsTrainerMixin, self)._save(directory, state_dict=merged)
                    checkpoints.write_delta_file(self.model, restriction, deltas, os.path.join(directory, DELTA_FILE))

                checkpoints.staged_save(output_dir, save)  # each file atomically
        elif self.args.should_save:
            checkpoints.staged_save(output_dir, functools.partial(super()._save, state_dict=state_dict))
        else:
            super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save and self._alps_selection is not None:
            self._alps_write_selection(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not self._alps_checkpoint_has_deltas(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load = functools.partial(super()._load_from_checkpoint, resume_from_checkpoint, model)
        checkpoints.load_delta_checkpoint(self.model, self._alps_restriction, resume_from_checkpoint, load)

    def _load_best_model(self) -> None:
        """load_best_model_at_end: a delta-mode checkpoint holds merged weights, so load it like a resume does
        (loading it as is would add the final deltas on top of the best checkpoint's merged rows)."""
        checkpoint = self.state.best_model_checkpoint
        if not self._alps_checkpoint_has_deltas(checkpoint):
            return super()._load_best_model()
        checkpoints.load_delta_checkpoint(self.model, self._alps_restriction, checkpoint, super()._load_best_model)

    def _alps_checkpoint_has_deltas(self, checkpoint: str) -> bool:
        """Whether `checkpoint` must be loaded as base + delta file (delta mode, not an FSDP sharded checkpoint)."""
        restriction = self._alps_restriction
        # A sharded (FSDP SHARDED_STATE_DICT) checkpoint holds the unmerged base and the deltas by name.
        return (
            restriction is not None
            and restriction.mode == "delta"
            and not checkpoints.is_sharded_checkpoint(checkpoint)
        )

    # ---- what the probe and importance scoring train on (the GRPO trainer has no loss of its own for them) --
    def _alps_probe_dataloader(self) -> torch.utils.data.DataLoader:
        """The batches of the probe and of importance scoring: the training set in one seeded order."""
        return probe_module.probe_dataloader(self)

    def _alps_probe_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The loss the probe and importance scoring differentiate: the trainer's own (`compute_loss`)."""
        return probe_module.training_loss(self, model, batch)

    # ---- setup --------------------------------------------------------------------------------
    def _alps_after_trl_init(self) -> None:
        """Hook for the trainer classes: runs right after the TRL constructor, before the checks and localization."""

    def _alps_bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        base = next(
            c
            for c in type(self).__mro__
            if c is not AlpsTrainerMixin
            and "__init__" in vars(c)
            and issubclass(c, transformers.Trainer)
            and not issubclass(c, AlpsTrainerMixin)
        )
        try:
            return dict(inspect.signature(base.__init__).bind(None, *args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)

    def _alps_preflight(self) -> None:
        """Every check that needs the built model, before any training."""
        alps, model = self._alps, unwrap_model(self.model)
        if hasattr(model, "peft_config") or hasattr(self.model, "peft_config"):
            raise ValueError(PEFT_MESSAGE)
        if self.model_init is not None:
            raise ValueError(
                "ALPS installs its restriction on the model the trainer holds; model_init (hyperparameter search) "
                "would replace it when training starts. Pass model= instead."
            )
        if self.optimizer is not None:
            raise ValueError(
                "ALPS builds the optimizer itself (restricted q/k/v go to the no-decay group; delta mode adds new "
                "parameters), so an optimizer instance passed in `optimizers=` cannot be used. Pass "
                "optimizer_cls_and_kwargs=(OptimizerClass, kwargs) or set args.optim instead."
            )
        self._alps_mode = resolve_mode(alps.alps_mode, model)
        if alps.alps_save_adapter and alps.alps_train_non_attention and not is_quantized(model):
            raise ValueError(NON_ATTENTION_MESSAGE)
        if alps.alps_save_adapter and importlib.util.find_spec("peft") is None:
            raise ValueError("alps_save_adapter=True writes a PEFT adapter, which needs PEFT: pip install peft.")
        layout = AttentionLayout.from_model(model)
        self._alps_layout = layout
        refuse_deepspeed_mask(self.args, self._alps_mode)
        refuse_fsdp1(self)
        optimizer_cls = (getattr(self, "optimizer_cls_and_kwargs", None) or (None,))[0]
        refuse_mask_optimizer(self.args, self._alps_mode, optimizer_cls)
        self._alps_head_source.check(self)

    def _alps_check_task_model(self) -> None:
        from alps_trl.localization.scoring import check_same_shape

        alps = self._alps
        task = self._alps_task_source = sources.open_task_model(alps)  # reused by the selection: fetched once
        check_same_shape(sources.base_weight_source(self.model, alps.alps_trust_remote_code), task)

    def _alps_check_importance_possible(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "alps_metric='importance' runs the whole unsharded model on every process before training, which "
                "FSDP/DeepSpeed do not keep. Localize first in a single-process or DDP run (e.g. the recipe with "
                "--alps_metric importance --localize_only true) and pass alps_heads."
            )

    def _alps_check_probe_possible(self, model: torch.nn.Module) -> None:
        alps = self._alps
        if alps.alps_probe_steps == 0:
            raise ValueError(
                "ALPS has nothing to localize heads from: no head_selection, no alps_heads, no alps_task_model and "
                "alps_probe_steps=0. Pass alps_task_model (a fine-tune of the same base), alps_heads (a saved "
                "selection), alps_metric='importance' (scores heads on the training data), or let the probe run "
                "(alps_probe_steps=None or > 0)."
            )
        if is_quantized(model):
            raise ValueError(
                "The ALPS probe fine-tunes all q/k/v weights, which a quantized base cannot do. Pass alps_heads (e.g. "
                "made with `alps-localize` or a probe run on the full-precision model), alps_task_model, or "
                "alps_metric='importance' (trains no base weight)."
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "The ALPS probe needs the whole unsharded model on every process, which FSDP/DeepSpeed do not keep. "
                "Localize first (alps-localize BASE TASK, or a single-GPU probe run) and pass alps_heads, or pass "
                "alps_task_model."
            )

    def _alps_resolve_checkpoint(self, resume: str | bool | None, strict: bool = True) -> str | None:
        """The complete checkpoint to resume from, or None. `strict`: resume=True without a checkpoint raises (as
        `train` would); the constructor is not strict, since the checkpoint may only exist by the time `train` runs.

        A killed save leaves a ``checkpoint-N`` that `get_last_checkpoint` still returns; it is never resumed from.
        """
        if resume is None or resume is False:
            return None
        output_dir = self.args.output_dir
        if resume is True or (isinstance(resume, str) and resume.lower() in LATEST and not os.path.exists(resume)):
            found = checkpoints.last_complete_checkpoint(output_dir)
            if found is None and strict:  # Trainer.train raises too, but only after localization would have run
                raise ValueError(
                    f"No complete checkpoint found in output directory ({output_dir}): pass the checkpoint path as "
                    "resume_from_checkpoint, or train without resuming."
                )
            return found
        path = str(resume)
        problem = checkpoints.checkpoint_problem(path) if os.path.isdir(path) else None
        if problem is None:
            return path  # complete, or missing (Trainer says so)
        parent = os.path.dirname(os.path.normpath(path))
        fallback = checkpoints.last_complete_checkpoint(parent, before_step=checkpoints.checkpoint_step(path))
        if fallback is None:
            raise ValueError(
                f"Cannot resume from {path}: {problem}, and {parent} holds no complete checkpoint before it. Train "
                "without resume_from_checkpoint to start over."
            )
        logger.warning_once(f"ALPS: {path} is incomplete ({problem}); resuming from {fallback} instead.")
        return fallback

    def _alps_set_aside_incomplete(self, checkpoint: str) -> None:
        """Move the interrupted checkpoints newer than `checkpoint` out of get_last_checkpoint's sight (main
        process; nothing is deleted)."""
        step = checkpoints.checkpoint_step(checkpoint)
        output_dir = os.path.abspath(self.args.output_dir)
        if step is None or not self.args.should_save or os.path.dirname(os.path.abspath(checkpoint)) != output_dir:
            return
        for moved in checkpoints.set_aside_incomplete(output_dir, step):
            logger.warning(f"ALPS: moved the interrupted checkpoint to {moved}; nothing resumes from it.")

    def _alps_setup(self, checkpoint: str | None) -> None:
        """Localize (or restore), share across ranks, install the restriction, write and log the selection."""
        if self._alps_restriction is not None:
            saved = self._alps_selection_from_checkpoint(checkpoint) if checkpoint is not None else None
            if saved is None or saved == self._alps_selection:
                return
            if self.optimizer is not None or self.state.global_step > 0:
                raise ValueError(
                    f"The checkpoint {checkpoint} was trained with other ALPS heads than the ones this trainer has "
                    "trained already. Build a new trainer to resume from it."
                )
            # Nothing has trained: swap the constructor's selection for the checkpoint's (the usual resume).
            checkpoints.check_resume_mode(checkpoint, self._alps_mode)
            previous = self._alps_restriction
            previous.uninstall(self.model)
            try:
                self._alps_install(saved, source="checkpoint")
            except BaseException:
                previous.install(self.model)  # back to the constructor's selection, as it was
                self._alps_restriction = previous
                raise
            return
        if checkpoint is not None:
            checkpoints.check_resume_mode(checkpoint, self._alps_mode)
        selection = self._alps_selection_from_checkpoint(checkpoint) if checkpoint else None
        if selection is not None:
            self._alps_source = "checkpoint"
        else:
            selection = self._alps_localize()
        self._alps_install(sources.share_selection(self.accelerator, selection), source=self._alps_source)

    def _alps_install(self, selection: HeadSelection, source: str | None) -> None:
        """Build and install the restriction for `selection` (the same on every rank), write and report it."""
        self._alps_source = source
        restriction = build_restriction(
            self.model,
            selection,
            self._alps_mode,
            restrict_o_proj=self._alps.alps_restrict_o_proj,
            train_non_attention=self._alps.alps_train_non_attention,
            delta_dtype=self._alps_delta_dtype(),
        )
        restriction.install(self.model)
        self._alps_selection, self._alps_restriction = selection, restriction
        self._alps_summary = restriction.summary(self.model)
        if self.args.should_save:
            self._alps_write_selection(self.args.output_dir)
        if self.accelerator.is_main_process:
            logger.warning(f"{report.summary_table(self._alps_summary)}\n{selection.summary()}")

    def _alps_delta_dtype(self) -> torch.dtype | None:
        """The dtype of the delta-mode parameters: None (float32) except under FSDP.

        FSDP2 requires one dtype for all trainable parameters it shards together (AssertionError "FSDP expects
        uniform original parameter dtype"): next to trainable bf16 MLP/norm weights in the same decoder layer,
        float32 deltas fail on the first forward. There the deltas take the dtype of the other trainable parameters.
        """
        alps, model = self._alps, unwrap_model(self.model)
        if self._alps_mode != "delta" or not self.is_fsdp_enabled or not alps.alps_train_non_attention:
            return None
        if is_quantized(model):  # every base parameter is frozen: only the deltas train
            return None
        attention = {n for lp in self._alps_layout.layers for n in lp.qkv_tensor_names()}
        dtypes = {
            p.dtype
            for n, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point() and n not in attention
        }
        if len(dtypes) != 1 or dtypes == {torch.float32}:
            return None  # several dtypes: DeltaRestriction.install warns with the remedies
        dtype = dtypes.pop()
        if self.accelerator.is_main_process:
            logger.warning(
                f"ALPS delta mode under FSDP: the head deltas are {dtype} like the other trainable parameters (FSDP "
                "needs one dtype per sharded layer). For float32 deltas, load the model in float32 and train with "
                "bf16 mixed precision."
            )
        return dtype

    def _alps_selection_from_checkpoint(self, checkpoint: str) -> HeadSelection | None:
        given = self._alps_explicit or self._alps_heads_file
        return sources.selection_from_checkpoint(checkpoint, self._alps_layout, given, self._alps)

    def _alps_localize(self) -> HeadSelection | None:
        """The selection of the run's head source; None on ranks that wait for the main process's broadcast."""
        self._alps_source = self._alps_head_source.name
        return self._alps_head_source.select(self)

    def _alps_localize_options(self) -> dict[str, Any]:
        """`localize_heads` keyword arguments from the alps_* options."""
        alps = self._alps
        return dict(
            ratio=alps.alps_ratio,
            metric=alps.alps_metric,
            strategy=alps.alps_strategy,
            temperature=alps.alps_temperature,
            seed=alps.alps_seed,
            device=self.args.device,  # the accelerator this process trains on (CPU with use_cpu)
        )

    def _alps_task_model_selection(self) -> HeadSelection | None:
        """Top heads between the base and ``alps_task_model``, scored on the main process."""
        from alps_trl.localization.localize import localize_heads

        alps = self._alps
        if not self.accelerator.is_main_process:
            return None
        task = self._alps_task_source or sources.open_task_model(alps)  # opened (fetched) once, by the preflight
        base = sources.base_weight_source(self.model, alps.alps_trust_remote_code)
        return localize_heads(base, task, **self._alps_localize_options())

    def _alps_probe_selection(self) -> HeadSelection | None:
        """Top heads between the model before and after an attention-only probe fine-tune on the training data."""
        from alps_trl.localization.localize import localize_heads
        from alps_trl.localization.weights import open_weight_source

        steps = planned_probe_steps(self._alps, sources.planned_training_steps(self.args, self.train_dataset))
        # Every rank runs the probe (compute_loss gathers metrics across ranks); only the main process scores.
        before, after = probe_module.run_probe(self, steps)
        if not self.accelerator.is_main_process:
            return None
        config = unwrap_model(self.model).config
        selection = localize_heads(
            open_weight_source(before, config=config),
            open_weight_source(after, config=config),
            **self._alps_localize_options(),
        )
        selection.provenance.update({"task": f"probe ({steps} attention-only steps on the training data)"})
        return selection

    def _alps_importance_selection(self) -> HeadSelection:
        """Top K by importance on the training data; every process computes the same (reduced) selection."""
        from alps_trl.localization.importance import importance_selection

        alps, world = self._alps, self.accelerator.num_processes
        planned = sources.planned_training_steps(self.args, self.train_dataset)
        per_process = planned_importance_batches(alps, planned, self.args.gradient_accumulation_steps)
        scores = sources.training_data_importance(self, per_process)
        inner = unwrap_model(self.model)
        return importance_selection(
            scores,
            self._alps_layout,
            alps.alps_ratio,
            num_batches=per_process * world,
            provenance={
                "base": getattr(inner, "name_or_path", "") or type(inner).__name__,
                "batches_per_process": per_process,
                "processes": world,
            },
        )

    def _alps_write_selection(self, directory: str) -> None:
        if os.path.abspath(directory) != os.path.abspath(self.args.output_dir) and os.path.isfile(
            os.path.join(self.args.output_dir, report.HEADS_FILE)
        ):
            report.copy_selection_files(self.args.output_dir, directory)
        else:
            report.write_selection_files(self._alps_selection, directory)


class AlpsCallback(TrainerCallback):
    """Attaches the restriction after `accelerator.prepare`, decays selected rows before each step, logs."""

    def __init__(self, trainer: AlpsTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._alps_restriction.attach(trainer.model_wrapped)
        if trainer.accelerator.is_main_process and trainer._alps_summary is not None:
            scalars = report.tracker_scalars(trainer._alps_summary, trainer._alps_selection)
            for cb in trainer.callback_handler.callbacks:
                if cb is not self:
                    cb.on_log(args, state, control, logs=dict(scalars), model=trainer.model)
            png = os.path.join(args.output_dir, report.HEATMAP_FILE)
            report.log_heatmap_to_trackers(trainer.callback_handler.callbacks, png)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        trainer = self.trainer
        restriction = trainer._alps_restriction
        if restriction is None or not args.weight_decay or _step_will_be_skipped(trainer):
            return
        restriction.apply_weight_decay(trainer.model, _group_lr(trainer, restriction), args.weight_decay)


def _step_will_be_skipped(trainer: AlpsTrainerMixin) -> bool:
    """fp16 with loss scaling: whether the coming optimizer step will be skipped (a non-finite gradient anywhere,
    on any process), as the GradScaler decides. The selected rows' decay must then be skipped too, or they would
    shrink on a step in which nothing else moves."""
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    found = any(
        p.grad is not None and not torch.isfinite(p.grad).all()
        for group in trainer.optimizer.param_groups
        for p in group["params"]
    )
    if trainer.accelerator.num_processes <= 1:
        return found
    flag = torch.tensor([float(found)], device=trainer.accelerator.device)
    return bool(trainer.accelerator.reduce(flag, reduction="sum").item() > 0)


def _group_lr(trainer: AlpsTrainerMixin, restriction) -> float:
    """The current learning rate of the optimizer group holding the restricted parameters."""
    exempt = restriction.decay_exempt_parameter_names(trainer.model)
    ids = {id(p) for n, p in unwrap_model(trainer.model).named_parameters() if n in exempt}
    for group in trainer.optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            return float(group["lr"])
    return float(trainer.optimizer.param_groups[0]["lr"])
