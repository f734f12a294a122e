"""Layer 5 (docs/architecture.md): the TRL integration.

- `config`: `AlpsArguments` and the `AlpsSFTConfig` / `AlpsDPOConfig` / `AlpsGRPOConfig` dataclasses.
- `mixin`: `AlpsTrainerMixin`, the pre-step (localization) and the restriction of the update.
- `head_sources`, `probe`: where a trainer's selection comes from; the probe run on the training data.
- `sft`, `dpo`, `grpo`: the trainers. `reference`: the DPO (and GRPO KL) reference without a second copy.
- `vllm_sync`: the GRPO policy's weights pushed to vLLM with the restriction applied.
- `checks`: pre-flight validation of the options. `checkpoints`: saving and resuming ALPS state.
- `private_api`: every private transformers/TRL API the trainers touch, in one list.
"""
