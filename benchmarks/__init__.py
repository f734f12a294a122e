"""Benchmarks and evidence for alps_trl; run each script as a module from the repository root (see README.md here).

common/      shared pieces: the fine-tuning loop, process measurement, run info, SmolLM2 loading, control selections
cost/        what ALPS costs: training step time and memory, localization time and memory, DDP overhead
miniature/   the paper's Tables 1-5 in miniature on synthetic tasks (CPU, tiny Llama)
real_model/  the same questions on the real SmolLM2-135M-Instruct
results/     the committed result files of the runs above
"""
