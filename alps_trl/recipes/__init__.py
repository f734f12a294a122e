"""Helpers of the recipe scripts in the repository's recipes/ folder.

- `main`: the shared main of `sft_alps.py`, `dpo_alps.py` and `grpo_alps.py`, and the table of recipe kinds.
- `arguments`: the scripts' argument dataclass and the checks before anything heavy (unknown `alps_*` keys, PEFT).
- `demo`: the built-in offline demo (its model, data and training defaults).
- `loading`: model, tokenizer and dataset loading (GGUF conversion, flash-attention fallback, k-bit device map).
- `report`: the end-of-run summary.
- `data`: dataset formatting (chat templates, prompt/completion columns).
- `rewards`: the GRPO recipe's reward functions.
- `generation_eval`: greedy exact-match evaluation before and after training.
"""
