"""One small training job for the kill-and-resume tests, with plain TRL or with ALPS, on a tiny model.

    python tests/kill_resume_job.py --kind sft|dpo|grpo --trainer plain|alps --mode mask|delta --out DIR [--resume X]

Trains `--steps` optimizer steps, saving a checkpoint every `--save-steps`, then saves the final model in
``DIR/final``. Everything is seeded, so two uninterrupted runs give the same weights bit for bit. Run it under
``accelerate launch --num_processes 2`` for DDP. Needs tests/ on PYTHONPATH (the test sets it).
"""

from __future__ import annotations

import argparse
import os


def build(kind: str, trainer: str, mode: str, out: str, steps: int, save_steps: int):
    from trainer_helpers import dpo_config, dpo_dataset, sft_config, sft_dataset, tiny_model, tiny_tokenizer

    alps = trainer == "alps"
    run = dict(
        max_steps=steps,
        save_strategy="steps",
        save_steps=save_steps,
        weight_decay=0.1,
        max_grad_norm=1.0,
    )
    if alps:
        run.update(alps_mode=mode, alps_probe_steps=1, alps_train_non_attention=mode == "mask")
    common = dict(model=tiny_model("llama"), processing_class=tiny_tokenizer())
    if kind == "sft":
        import trl

        from alps_trl import AlpsSFTTrainer

        cls = AlpsSFTTrainer if alps else trl.SFTTrainer
        args = sft_config(out, alps=alps, gradient_accumulation_steps=2, **run)
        return cls(args=args, train_dataset=sft_dataset(), **common)
    if kind == "dpo":
        import trl

        from alps_trl import AlpsDPOTrainer

        cls = AlpsDPOTrainer if alps else trl.DPOTrainer
        if not alps:  # plain TRL would load the reference by the in-memory model's (empty) name
            common["ref_model"] = tiny_model("llama")
        return cls(args=dpo_config(out, alps=alps, **run), train_dataset=dpo_dataset(), **common)
    import trl
    from test_grpo_trainer import grpo_config, grpo_dataset, length_reward

    from alps_trl import AlpsGRPOTrainer

    cls = AlpsGRPOTrainer if alps else trl.GRPOTrainer
    args = grpo_config(out, plain=not alps, **run)
    return cls(reward_funcs=[length_reward], args=args, train_dataset=grpo_dataset(), **common)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["sft", "dpo", "grpo"], default="sft")
    parser.add_argument("--trainer", choices=["plain", "alps"], default="alps")
    parser.add_argument("--mode", choices=["mask", "delta"], default="mask")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--collective-timeout", type=int, default=None, help="seconds; the process group's timeout")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 on CPU ranks (launch with the fsdp2 config)")
    a = parser.parse_args()
    if a.fsdp:
        from distributed.train_tiny import mark_fsdp_switch

        mark_fsdp_switch()
    if a.collective_timeout:
        # What --ddp_timeout does on GPUs: transformers passes it to the process group only when the ranks are not
        # CPU ranks, so these gloo ranks get it here, before the training arguments set the process group up.
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=a.collective_timeout))
    trainer = build(a.kind, a.trainer, a.mode, a.out, a.steps, a.save_steps)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(os.path.join(a.out, "final"))


if __name__ == "__main__":
    main()
