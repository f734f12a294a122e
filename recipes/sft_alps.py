"""Supervised fine-tuning with ALPS: only the task-sensitive attention heads' q/k/v rows train.

TRL's `trl/scripts/sft.py` with `AlpsSFTTrainer` / `AlpsSFTConfig` (so every `alps_*` option works in a
recipe YAML or on the command line), the paper's Alpaca prompt formatting of the dataset, and a
built-in offline demo.

# Demo: no arguments. A small Llama (random init, config shipped in recipes/demo/model) trains on the shipped
# instruction data; heads are localized with a short probe fine-tune; about a minute on a laptop CPU.
```bash
accelerate launch recipes/sft_alps.py
python recipes/sft_alps.py --output_dir /tmp/alps_demo --num_train_epochs 1
```

# A paper recipe (8 GPUs; the YAML names its accelerate config and the GPU count its batch size assumes)
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft_alps.py \
    --config recipes/llama-3.2-1b/general/config_alps.yaml
```

# Any model and dataset, CLI only
```bash
accelerate launch recipes/sft_alps.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B \
    --dataset_name TIGER-Lab/MathInstruct \
    --alps_ratio 0.1 \
    --learning_rate 2e-5 \
    --output_dir Qwen2.5-0.5B-ALPS
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

    from alps_trl import AlpsSFTTrainer
    from alps_trl import recipe_utils as ru

    start = time.perf_counter()
    ru.check_no_peft(model_args)
    demo = model_args.model_name_or_path is None
    want_eval = not script_args.localize_only and (
        training_args.eval_strategy != "no" or script_args.eval_before_and_after
    )
    train_dataset, eval_dataset = ru.prepare_datasets(
        script_args, "sft", want_eval, default_path=str(DEMO_DIR / "data" / "sft") if demo else None
    )
    if demo:
        model, tokenizer = ru.build_demo_model(
            str(DEMO_DIR / "model"), training_args.seed, model_args.attn_implementation
        )
    else:
        model, tokenizer = ru.load_model(model_args, training_args, get_quantization_config(model_args)), None

    trainer = AlpsSFTTrainer(
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

    from alps_trl.config import AlpsSFTConfig
    from alps_trl.recipe_utils import AlpsScriptArguments

    return TrlParser((AlpsScriptArguments, AlpsSFTConfig, ModelConfig))


if __name__ == "__main__":
    from alps_trl.recipe_utils import parse_recipe_args

    script_args, training_args, model_args = parse_recipe_args(make_parser(), "sft", sys.argv[1:])
    main(script_args, training_args, model_args)
