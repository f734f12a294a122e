"""Helpers of the recipe scripts in the repository's recipes/ folder.

- `arguments`: the scripts' argument dataclass, demo defaults, model and tokenizer loading.
- `data`: dataset formatting (chat templates, prompt/completion columns).
- `main`: the shared main of `sft_alps.py` and `dpo_alps.py`.
- `generation_eval`: greedy exact-match evaluation before and after training.
"""
