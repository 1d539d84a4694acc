"""Training: data formats and templates, tokenisation and batching, the loop, checkpoints."""
