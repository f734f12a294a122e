"""The paper's questions on the real SmolLM2-135M-Instruct: head choice and the ablations (reproduce)."""
