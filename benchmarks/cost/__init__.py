"""What ALPS costs: training step time and memory, localization time and memory, DDP overhead."""
