"""The paper's Tables 1-5 in miniature: a tiny Llama pretrained on synthetic tasks, on the CPU (reproduce)."""
