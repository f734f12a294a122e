"""The body of the recipe scripts (`recipes/sft_alps.py`, `recipes/dpo_alps.py`, `recipes/grpo_alps.py`): one
`main` for all three.

The scripts keep TRL's shape (parse with `TrlParser`, call `main(script_args, training_args, model_args)`); what
differs between the kinds is one row of `RECIPE_KINDS`: the trainer, its config, the data kind, and whether the
trainer takes reward functions. A run: load data (errors before any model is built) -> load the model (a GGUF file
is converted once) -> build the ALPS trainer (localizes heads) -> evaluate (loss, and greedy exact match on held-out
prompts) -> train -> evaluate again -> save -> print the summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from alps_trl.recipes import arguments, loading, report

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class RecipeKind:
    """What one recipe kind runs: class names in `alps_trl` and `alps_trl.trainers.config`, and its data."""

    trainer: str
    config: str
    data_kind: str  # the `kind` of alps_trl.recipes.data.format_dataset ("grpo": prompts as they are)
    takes_rewards: bool = False  # the trainer's `reward_funcs` come from --reward_funcs


RECIPE_KINDS = {
    "sft": RecipeKind("AlpsSFTTrainer", "AlpsSFTConfig", "sft"),
    "dpo": RecipeKind("AlpsDPOTrainer", "AlpsDPOConfig", "preference"),
    "grpo": RecipeKind("AlpsGRPOTrainer", "AlpsGRPOConfig", "grpo", takes_rewards=True),
}


def main(kind: str, script_args: Any, training_args: Any, model_args: Any) -> Any:
    """Run one recipe of `kind` ("sft", "dpo" or "grpo"); returns the trainer."""
    import alps_trl

    recipe = RECIPE_KINDS[kind]
    start = time.perf_counter()
    arguments.check_no_peft(model_args)
    arguments.check_adapter_export(training_args, model_args)
    model_name = model_args.model_name_or_path
    want_eval = not script_args.localize_only and (
        training_args.eval_strategy != "no" or script_args.eval_before_and_after or script_args.eval_generations > 0
    )
    train_dataset, eval_dataset = loading.prepare_datasets(script_args, recipe.data_kind, want_eval)
    model, tokenizer = loading.load_model_and_tokenizer(script_args, training_args, model_args)

    extra = {}
    if recipe.takes_rewards:
        from alps_trl.recipes.rewards import reward_functions

        extra["reward_funcs"] = reward_functions(script_args.reward_funcs)
    trainer = getattr(alps_trl, recipe.trainer)(
        model=model,
        **extra,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    say = trainer.accelerator.print
    # Reading head_selection localizes now (probe, task model or heads file) instead of at the start of train().
    say(report.selection_line(trainer.head_selection))
    if script_args.localize_only:
        for line in report.output_lines(training_args.output_dir)[1:]:
            say(line)
        return trainer

    before = report.evaluate_before_training(trainer) if script_args.eval_before_and_after else None
    generations_before = generation_eval(trainer, script_args, eval_dataset, "before training")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = trainer.evaluate() if script_args.eval_before_and_after else None
    generations_after = generation_eval(trainer, script_args, eval_dataset, "after training")
    trainer.save_model(training_args.output_dir)

    lines = report.summary_lines(trainer, before, after, time.perf_counter() - start, model_name=model_name)
    if generations_after is not None:
        from alps_trl.recipes.generation_eval import comparison_lines

        at = lines.index(next(x for x in lines if x.startswith("Model: ")))
        lines[at:at] = comparison_lines(generations_before, generations_after, script_args.eval_examples)
    for line in lines:
        say(line)

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # every supported transformers (>= 5.22) has Trainer.end
    return trainer


def generation_eval(trainer: Any, script_args: Any, eval_dataset: Any, when: str):
    """Greedy exact match on the first `eval_generations` test prompts (main process), or None where skipped.

    Skipped with a warning where a forward outside training would break it (see
    `report.generation_blocker`); other processes skip it and wait at the next collective.
    """
    if script_args.eval_generations <= 0 or eval_dataset is None:
        return None
    blocker = report.generation_blocker(trainer, before_training=when == "before training")
    if blocker:
        logger.warning(f"Skipping the generation evaluation {when}: {blocker}.")
        return None
    if not trainer.accelerator.is_main_process:
        return None
    from alps_trl.recipes.generation_eval import generate_answers, prompts_and_references

    prompts, references = prompts_and_references(eval_dataset, script_args.eval_generations)
    result = generate_answers(
        trainer.model,
        trainer.processing_class,
        prompts,
        references,
        max_new_tokens=script_args.eval_max_new_tokens,
        batch_size=max(1, trainer.args.per_device_eval_batch_size),
        desc=f"Exact match {when}",
        disable_progress=bool(trainer.args.disable_tqdm),
    )
    reward_funcs = [f for f in getattr(trainer, "reward_funcs", []) if callable(f) and hasattr(f, "__name__")]
    if reward_funcs:  # GRPO: the rewards of the greedy answers, with the split's columns as the trainer passes them
        n = len(prompts)
        columns = {c: list(eval_dataset.select(range(n))[c]) for c in eval_dataset.column_names if c != "prompt"}
        for func in reward_funcs:
            scores = func(prompts=prompts, completions=result.generations, **columns)
            result.rewards[func.__name__] = sum(scores) / max(1, len(scores))
    return result


def recipe_parser(kind: str):
    """TRL's parser of a recipe script: (AlpsScriptArguments, the kind's Alps*Config, ModelConfig)."""
    from trl import ModelConfig, TrlParser

    from alps_trl.trainers import config

    return TrlParser((arguments.AlpsScriptArguments, getattr(config, RECIPE_KINDS[kind].config), ModelConfig))


def script_entry(kind: str, make_parser, argv: list[str], demo_dir: str | os.PathLike) -> Any:
    """`if __name__ == "__main__":` of a recipe script: parse (demo defaults when no model is named) and run."""
    script_args, training_args, model_args = arguments.parse_recipe_args(make_parser(), kind, argv, str(demo_dir))
    return main(kind, script_args, training_args, model_args)
