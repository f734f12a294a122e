"""GRPO (RL with verifiable rewards) with ALPS: only the task-sensitive attention heads' q/k/v rows train.

TRL's `trl/scripts/grpo.py` with `AlpsGRPOTrainer` / `AlpsGRPOConfig` (so every `alps_*` option works in a recipe
YAML or on the command line), reward functions by name (`--reward_funcs exact_answer answer_format`, see
`alps_trl.recipes.rewards`), GGUF models and a built-in offline demo. The KL term's reference (`--beta > 0`) is
the policy with the ALPS update switched off when only the heads train: no second copy of the model. The heads
come from a probe on the prompts' reference answers (the "solution" column), a heads file or a task model.
The body is `alps_trl.recipes.main.main`, shared with `recipes/sft_alps.py` and `recipes/dpo_alps.py`.

# Demo: no arguments. SmolLM2-135M-Instruct answers "What is 2 + 3? Reply with the number only." with "2 + 3 = 5";
# GRPO with an exact-answer and a format reward teaches it the bare number, on held-out sums.
```bash
accelerate launch recipes/grpo_alps.py
```

# A recipe (8 GPUs; the heads from an SFT run on the same task, the reference switched off in the deltas)
```bash
accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/grpo_alps.py \
    --config recipes/llama-3.2-1b/grpo/config_alps.yaml
```
"""

import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def main(script_args, training_args, model_args):
    from alps_trl.recipes.main import main as run

    return run("grpo", script_args, training_args, model_args)


def make_parser():
    from alps_trl.recipes.main import recipe_parser

    return recipe_parser("grpo")


if __name__ == "__main__":
    from alps_trl.recipes.main import script_entry

    script_entry("grpo", make_parser, sys.argv[1:], DEMO_DIR)
