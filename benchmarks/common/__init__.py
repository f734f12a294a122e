"""Pieces the benchmarks share: the fine-tuning loop, process measurement, run info, SmolLM2, control selections."""
