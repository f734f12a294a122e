"""Layer 5 of the design: the TRL integration.

- `config`: `AlpsArguments` and the `AlpsSFTConfig` / `AlpsDPOConfig` dataclasses.
- `mixin`: `AlpsTrainerMixin`, the pre-step (localization) and the restriction of the update.
- `head_sources`, `probe`: where a trainer's selection comes from; the probe run on the training data.
- `sft`, `dpo`: the trainers. `reference`: the DPO reference without a second copy.
- `checks`: pre-flight validation of the options. `checkpoints`: saving and resuming ALPS state.
- `private_api`: every private transformers/TRL API the trainers touch, in one list.
"""
