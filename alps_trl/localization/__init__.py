"""Layers 1-3 (docs/architecture.md): which heads to train.

- `anatomy`: where each layer's q/k/v/o projections and heads are (`AttentionLayout`).
- `weights`, `gguf`: stream q/k/v tensors from checkpoints (safetensors, .bin, GGUF) or in-memory models.
- `scoring`, `array_ops`: the PAD score and the ablation distances per head.
- `selection`: `HeadSelection` and the strategies (top-k, random, layer-consistent).
- `localize`: `localize_heads`, scoring plus selection in one call.
- `importance`: the data-driven head importance (gate gradients).

The trainers' sources of heads (probe run, saved selection, importance on the training data) drive a trainer,
so they live one layer up, in `alps_trl.trainers`.
"""
