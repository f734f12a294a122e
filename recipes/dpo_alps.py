"""Direct preference optimization with ALPS: only the task-sensitive attention heads' q/k/v rows train.

TRL's `trl/scripts/dpo.py` with `AlpsDPOTrainer` / `AlpsDPOConfig` (so every `alps_*` option works in a
recipe YAML or on the command line) and the Alpaca prompt formatting of UltraFeedback-style preference
data. The reference model is the policy with the ALPS update switched off: no second copy of the model.

# Demo: no arguments. A small Llama (random init, config shipped in recipes/demo/model) learns the shipped
# preference pairs; heads are localized with a short probe fine-tune.
```bash
accelerate launch recipes/dpo_alps.py
```

# A recipe (8 GPUs)
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/dpo_alps.py \
    --config recipes/llama-3.2-1b/dpo/config_alps.yaml
```
"""

import sys
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def main(script_args, training_args, model_args):
    import transformers
    from packaging.version import Version
    from trl import get_quantization_config

    from alps_trl import AlpsDPOTrainer
    from alps_trl import recipe_utils as ru

    start = time.perf_counter()
    ru.check_no_peft(model_args)
    demo = model_args.model_name_or_path is None
    want_eval = not script_args.localize_only and (
        training_args.eval_strategy != "no" or script_args.eval_before_and_after
    )
    train_dataset, eval_dataset = ru.prepare_datasets(
        script_args, "preference", want_eval, default_path=str(DEMO_DIR / "data" / "dpo") if demo else None
    )
    if demo:
        model, tokenizer = ru.build_demo_model(
            str(DEMO_DIR / "model"), training_args.seed, model_args.attn_implementation
        )
    else:
        model, tokenizer = ru.load_model(model_args, training_args, get_quantization_config(model_args)), None

    trainer = AlpsDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    say = trainer.accelerator.print
    # Reading head_selection localizes now (probe, task model or heads file) instead of at the start of train().
    say(ru.selection_line(trainer.head_selection))
    if script_args.localize_only:
        for line in ru.output_lines(training_args.output_dir)[1:]:
            say(line)
        return

    before = ru.evaluate_before_training(trainer) if script_args.eval_before_and_after else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = trainer.evaluate() if script_args.eval_before_and_after else None
    trainer.save_model(training_args.output_dir)

    for line in ru.summary_lines(trainer, before, after, time.perf_counter() - start):
        say(line)

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser():
    from trl import ModelConfig, TrlParser

    from alps_trl.config import AlpsDPOConfig
    from alps_trl.recipe_utils import AlpsScriptArguments

    return TrlParser((AlpsScriptArguments, AlpsDPOConfig, ModelConfig))


if __name__ == "__main__":
    from alps_trl.recipe_utils import parse_recipe_args

    script_args, training_args, model_args = parse_recipe_args(make_parser(), "dpo", sys.argv[1:])
    main(script_args, training_args, model_args)
