"""Direct preference optimization with ALPS: only the task-sensitive attention heads' q/k/v rows train.

TRL's `trl/scripts/dpo.py` with `AlpsDPOTrainer` / `AlpsDPOConfig` (so every `alps_*` option works in a
recipe YAML or on the command line) and the Alpaca prompt formatting of UltraFeedback-style preference
data. The reference model is the policy with the ALPS update switched off: no second copy of the model.
The body is `alps_trl.recipes.main.main`, shared with `recipes/sft_alps.py` and `recipes/grpo_alps.py`.

# Demo: no arguments. SmolLM2-135M-Instruct learns to prefer the bare answer ("Paris") to the full sentence
# it gives before ("The capital of France is Paris."), on countries held out of the preference data.
```bash
accelerate launch recipes/dpo_alps.py
```

# The toy model (random 4-layer Llama from recipes/demo/model)
```bash
accelerate launch recipes/dpo_alps.py --config recipes/demo/toy_dpo.yaml
```

# A recipe (8 GPUs)
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/dpo_alps.py \
    --config recipes/llama-3.2-1b/dpo/config_alps.yaml
```
"""

import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def main(script_args, training_args, model_args):
    from alps_trl.recipes.main import main as run

    return run("dpo", script_args, training_args, model_args)


def make_parser():
    from alps_trl.recipes.main import recipe_parser

    return recipe_parser("dpo")


if __name__ == "__main__":
    from alps_trl.recipes.main import script_entry

    script_entry("dpo", make_parser, sys.argv[1:], DEMO_DIR)
