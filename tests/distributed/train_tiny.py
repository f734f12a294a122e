"""Tiny ALPS training runs for the distributed tests (CPU, gloo), one or more scenarios per launch.

Launched by the tests with the repository's own Accelerate configs, e.g.

    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        --num_processes 2 tests/distributed/train_tiny.py --base TINY_DIR --out DIR --scenarios sft-mask,dpo-mask

TINY_DIR holds the tiny model, tokenizer and datasets that tests/distributed_helpers.make_tiny_base writes.

With ``--fsdp`` (and the fsdp2 config) it applies the CPU-only switch that turns the gloo ranks into a
real FSDP2 run: accelerate promotes only GPU-type distributed states to FSDP, so the state is marked
MULTI_GPU before the trainer builds its Accelerator.

Every rank writes ``DIR/<scenario>/rank<r>.json``: world size and distributed type seen by the trainer,
whether the parameters were FSDP2 DTensors, the selection fingerprint, per-tensor checks on the gathered
full tensors (unselected q/k/v rows bit-identical to the base, selected rows changed), whether the
non-attention weights trained, and a sha256 over all final (merged) tensors, to compare across ranks and
with the saved checkpoint. The test process asserts on these files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys

import torch
from distributed_helpers import state_digest  # tests/ is on PYTHONPATH (distributed_helpers.child_env)

SCENARIOS = {
    # name: (trainer, alps_mode, train_non_attention)
    "sft-mask": ("sft", "mask", True),
    "sft-delta": ("sft", "delta", True),
    "dpo-mask": ("dpo", "mask", False),
    "dpo-delta": ("dpo", "delta", True),
    "sft-mask-resume": ("sft", "mask", True),
    "sft-delta-resume": ("sft", "delta", True),
    # 4-bit NF4 base (bf16 quant storage, as recipes/accelerate_configs/fsdp2_qlora.yaml documents): delta mode.
    "sft-delta-4bit": ("sft", "delta", False),
    # The DPO data as an in-memory datasets.Dataset (from_dict), the most common way it is passed.
    "dpo-delta-memory": ("dpo", "delta", True),
    # The same run with an explicit deepcopy of the base as ref_model: the losses both must log.
    "dpo-delta-memory-copyref": ("dpo", "delta", True),
    # A bf16 base: the deltas must take the dtype of the trainable bf16 MLP weights beside them under FSDP2.
    "sft-delta-bf16": ("sft", "delta", True),
    # No selection given: alps_metric="importance" localizes on each rank's share of the training batches.
    "sft-importance": ("sft", "mask", True),
    "dpo-importance": ("dpo", "mask", False),
    # No selection given, strategy top_k: the probe, each rank on its own share of the batches.
    "sft-probe": ("sft", "delta", True),
    # GRPO with a KL term: a frozen copy as the reference (the rest trains), or the parameter-free one (heads only).
    "grpo-mask": ("grpo", "mask", True),
    "grpo-delta": ("grpo", "delta", False),
}
PROBE_STEPS = 2
IMPORTANCE_BATCHES = 2  # per rank
HEADS = [(0, 1), (1, 6)]
RESUME_FROM = 2  # the resume scenario saves every RESUME_FROM steps and resumes from checkpoint-RESUME_FROM
OTHER_HEADS = [(0, 2), (1, 6)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="tiny base model directory (save_pretrained of tiny_model)")
    parser.add_argument("--out", required=True, help="directory for reports and checkpoints")
    parser.add_argument("--scenarios", default="sft-mask", help=f"comma-separated, from {sorted(SCENARIOS)}")
    parser.add_argument("--fsdp", action="store_true", help="turn the gloo ranks into an FSDP2 run (CPU switch)")
    parser.add_argument(
        "--deepspeed",
        action="store_true",
        help="turn the gloo ranks into a DeepSpeed run (CPU; one scenario per launch)",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="save the final model to <scenario>/final")
    parser.add_argument("--mismatch", action="store_true", help="give rank 1 another head selection (must fail)")
    parser.add_argument(
        "--writer-only-save",
        action="store_true",
        help="make Trainer.save_model call _save on the writing process only (as earlier transformers did)",
    )
    return parser.parse_args(argv)


def selection_for(heads):
    from alps_trl.localization.selection import HeadSelection

    return HeadSelection(2, 8, 2, heads, head_dim=8, hidden_size=64, model_type="llama", strategy="fixed")


def dataset_for(base: str, kind: str, in_memory: bool = False):
    from datasets import Dataset, load_from_disk

    dataset = load_from_disk(os.path.join(base, f"data_{kind}"))
    # from_dict keeps the rows in memory only: no cache files that other ranks could read.
    return Dataset.from_dict(dataset.to_dict()) if in_memory else dataset


def make_config(
    kind: str, mode: str, non_attention: bool, out: str, steps: int, strategy: str | None, save: bool, **alps
):
    from alps_trl.trainers.config import AlpsDPOConfig, AlpsSFTConfig

    common = dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=RESUME_FROM,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # A collective that one rank misses fails the test within minutes instead of hanging for half an hour.
        ddp_timeout=180,
        alps_mode=mode,
        alps_train_non_attention=non_attention,
        alps_strategy=strategy or "top_k",
        alps_seed=123,
        **alps,
    )
    if kind == "sft":
        return AlpsSFTConfig(max_length=48, **common)
    if kind == "grpo":
        from alps_trl.trainers.config import AlpsGRPOConfig

        return AlpsGRPOConfig(num_generations=2, max_completion_length=4, beta=0.1, **common)
    return AlpsDPOConfig(max_length=48, beta=0.1, **common)


def length_reward(completions, **kwargs):
    """A verifiable reward for the GRPO scenarios (it varies within a group, so the advantages are not zero)."""
    return [1.0 / (1 + len(c)) for c in completions]


def mark_fsdp_switch() -> None:
    # CPU only: accelerate promotes only GPU-type states to FSDP (see docs/platform.md), so present the gloo ranks
    # as MULTI_GPU; the Accelerator built by the trainer then applies the FSDP2 plugin from the launch config.
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState().distributed_type = DistributedType.MULTI_GPU


def mark_deepspeed_switch(config) -> None:
    # CPU only: the ranks run on the CPU (gloo) once the training arguments set up their devices; afterwards the
    # Accelerator must not be told "CPU", or accelerate keeps the plain multi-CPU state instead of DeepSpeed.
    _ = config.device
    os.environ["ACCELERATE_USE_CPU"] = "false"


def load_base(path: str, four_bit: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=quant, device_map="cpu", attn_implementation="sdpa"
    )


def full_tensors(model) -> dict[str, torch.Tensor]:
    """All parameters as full CPU tensors (FSDP2 DTensors and ZeRO-3 partitions gathered: a collective)."""
    from alps_trl.localization.anatomy import unwrap_model

    params = list(unwrap_model(model).named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params])
    out = {}
    with gather:
        for name, param in params:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            out[name] = full.detach().to("cpu").clone()
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (packed 4-bit weights stored as bf16 contain NaN patterns, which never compare equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def selected_rows(layout, selection) -> dict[str, list[int]]:
    """q/k/v weight name -> selected rows, from the method's definition (head rows, and their kv groups)."""
    rows: dict[str, list[int]] = {}
    for lp in layout.layers:
        heads = [h for layer, h in selection.heads if layer == lp.layer]
        groups = sorted({layout.kv_group_of(h) for h in heads})
        q = [r for h in heads for r in range(layout.q_rows(h).start, layout.q_rows(h).stop)]
        kv = [r for g in groups for r in range(layout.kv_rows(g).start, layout.kv_rows(g).stop)]
        for block, sel in ((lp.q_weight, q), (lp.k_weight, kv), (lp.v_weight, kv)):
            rows[block.name] = [block.offset + r for r in sel]
    return rows


def check_rows(base: dict, final: dict, rows: dict[str, list[int]]) -> dict:
    report = {}
    for name, sel in rows.items():
        b, f = base[name], final[name]
        frozen = torch.ones(b.shape[0], dtype=torch.bool)
        frozen[sel] = False
        report[name] = {
            "rows": b.shape[0],
            "selected": len(sel),
            "unselected_identical": bool(bits_equal(b[frozen], f[frozen])),
            "selected_changed": bool(sel) and bool((b[~frozen] != f[~frozen]).any(dim=-1).all()),
        }
    return report


def record_importance(scored: dict[str, list]) -> None:
    """Wrap `head_importance` so this rank's report holds its own (pre-reduction) scores and a digest per batch."""
    import alps_trl.localization.importance as importance

    # The unwrapped function: a launch with several importance scenarios records each into its own report only.
    original = getattr(importance.head_importance, "unwrapped", importance.head_importance)

    def recording(model, batches, **kwargs):
        batches = list(batches)
        for batch in batches:
            scored["batch_digests"].append(batch_digest(batch))
        local = original(model, batches, **kwargs)
        scored["local_scores"].append(local.tolist())
        return local

    recording.unwrapped = original
    importance.head_importance = recording


def record_probe_batches(scored: dict[str, list]) -> None:
    """Wrap the probe's loss so this rank's report holds a digest of every batch the probe trained on."""
    from alps_trl.trainers import probe

    original = getattr(probe.training_loss, "unwrapped", probe.training_loss)

    def recording(trainer, model, batch):
        scored["probe_batch_digests"].append(batch_digest(batch))
        return original(trainer, model, batch)

    recording.unwrapped = original
    probe.training_loss = recording


def batch_digest(batch: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(k for k, v in batch.items() if torch.is_tensor(v)):
        h.update(key.encode() + batch[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_on_writer_only() -> None:
    """Trainer.save_model as transformers < 5 wrote it: the state dict gathered on every rank, `_save` called on
    the writing process only (ALPS must not start a collective inside `_save`). Final saves only."""
    import transformers

    original = transformers.Trainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call:  # checkpoints during training: as transformers does them now
            return original(self, output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state_dict = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    transformers.Trainer.save_model = save_model


def run_scenario(name: str, args: argparse.Namespace) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
    from alps_trl.restriction.delta import merge_state_dict
    from alps_trl.trainers.dpo import AlpsDPOTrainer
    from alps_trl.trainers.grpo import AlpsGRPOTrainer
    from alps_trl.trainers.sft import AlpsSFTTrainer

    kind, mode, non_attention = SCENARIOS[name]
    out = os.path.join(args.out, name)
    resume = name.endswith("-resume")
    tokenizer = AutoTokenizer.from_pretrained(args.base)

    def build_trainer(steps: int, heads, strategy, save: bool):
        config = make_config(kind, mode, non_attention, out, steps, strategy, save, **importance_options)
        if args.fsdp:
            mark_fsdp_switch()
        if args.deepspeed:
            mark_deepspeed_switch(config)
        model = load_base(args.base, four_bit, dtype)
        trainer_cls = {"sft": AlpsSFTTrainer, "dpo": AlpsDPOTrainer, "grpo": AlpsGRPOTrainer}[kind]
        selection = None if heads is None else selection_for(heads)
        extra = {"ref_model": copy.deepcopy(model)} if name.endswith("-copyref") else {}
        if kind == "grpo":
            extra = {"reward_funcs": [length_reward]}
        trainer = trainer_cls(
            model=model,
            **extra,
            args=config,
            train_dataset=dataset_for(args.base, kind, in_memory="-memory" in name),
            processing_class=tokenizer,
            head_selection=selection,
        )
        if args.deepspeed:
            # Partition every parameter under ZeRO-3, however small (the tiny model's would otherwise all stay
            # whole on every rank, below DeepSpeed's persistence threshold).
            zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
            if zero.get("stage") == 3:
                zero["stage3_param_persistence_threshold"] = 0
        return trainer

    rank = int(os.environ.get("RANK", "0"))
    heads = OTHER_HEADS if (args.mismatch and rank == 1) else HEADS
    importance = name.endswith("-importance")
    importance_options = {}
    scored: dict[str, list] = {"local_scores": [], "batch_digests": [], "probe_batch_digests": []}
    if importance:
        heads = None
        importance_options = dict(alps_metric="importance", alps_importance_batches=IMPORTANCE_BATCHES)
        record_importance(scored)
    if name == "sft-probe":
        heads = None
        importance_options = dict(alps_probe_steps=PROBE_STEPS)
        record_probe_batches(scored)
    four_bit = name.endswith("-4bit")
    dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
    base = full_tensors(load_base(args.base, four_bit, dtype))
    if resume:
        # First run saves sharded checkpoints; a fresh trainer with NO selection given (and a strategy that would
        # pick other heads) resumes from the first checkpoint and must restore the saved selection.
        steps = max(args.steps, RESUME_FROM + 1)
        first = build_trainer(steps, heads, None, save=True)
        first.train()
        first_fingerprint = first.head_selection.fingerprint()
        checkpoint = os.path.join(out, f"checkpoint-{RESUME_FROM}")
        PartialState().wait_for_everyone()
        trainer = build_trainer(steps, None, "random", save=False)
        trainer.train(resume_from_checkpoint=checkpoint)
    else:
        first_fingerprint = None
        trainer = build_trainer(args.steps, heads, None, save=False)
        if PartialState().is_main_process:
            # What users write to look at the heads: on the main process only, before train(). Must not hang.
            print(trainer.head_selection.summary())
        trainer.train()

    state = trainer.accelerator.state
    model = trainer.model
    is_dtensor = any(hasattr(p, "full_tensor") for p in model.parameters())
    partitioned = any(getattr(p, "ds_numel", 0) and p.numel() == 0 for p in model.parameters())
    final = full_tensors(model)
    restriction = trainer.restriction
    raw = {k: v for k, v in final.items() if ".alps_delta." not in k}
    deltas = restriction.delta_state_dict(model) if restriction.mode == "delta" else {}
    layout = AttentionLayout.from_model(unwrap_model(model))
    rows = selected_rows(layout, trainer.head_selection)
    if four_bit:
        # Packed 4-bit weights cannot be merged in memory; rows are checked after alps-merge by the test.
        merged, checked_rows = raw, {}
    else:
        merged, checked_rows = (merge_state_dict(raw, deltas) if deltas else raw), rows
    mlp = [k for k in base if ".mlp." in k]
    report = {
        "scenario": name,
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        "params_are_dtensors": is_dtensor,
        "wrapper": type(trainer.model_wrapped).__name__,
        "zero3_partitioned": partitioned,
        "reference_kind": getattr(trainer, "reference_kind", None),
        "mode": restriction.mode,
        "fingerprint": trainer.head_selection.fingerprint(),
        "first_run_fingerprint": first_fingerprint,
        "heads": [list(h) for h in trainer.head_selection.heads],
        "rows": check_rows(base, merged, checked_rows),
        "base_qkv_untouched": all(bits_equal(base[n], raw[n]) for n in rows),
        "base_untouched": all(bits_equal(base[k], raw[k]) for k in base),
        "changed_base_tensors": sorted(k for k in base if not bits_equal(base[k], raw[k])),
        "deltas_trained": all(bool(v.abs().sum() > 0) for k, v in deltas.items() if k.endswith(".alps_delta")),
        "num_deltas": sum(k.endswith(".alps_delta") for k in deltas),
        "expect_non_attention_trained": non_attention and not four_bit,
        "mlp_changed": any(not bits_equal(base[k], merged[k]) for k in mlp),
        "digest": state_digest(merged),
        "shapes": {k: list(v.shape) for k, v in merged.items() if k in rows},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "delta_dtypes": sorted({str(v.dtype) for k, v in final.items() if ".alps_delta." in k}),
        "metric": trainer.head_selection.metric,
        "scores": None if trainer.head_selection.scores is None else trainer.head_selection.scores.tolist(),
        "provenance": trainer.head_selection.provenance,
        **scored,
    }
    report["all_digests"] = gather_object([report["digest"]])
    if args.save:
        trainer.save_model(os.path.join(out, "final"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f, indent=1)
    PartialState().wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.writer_only_save:
        save_on_writer_only()
    for name in names:
        run_scenario(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
