"""Command-line tools: generate, score, best_of_k, convert, bench (python -m rlhf_jax.tools.NAME)."""
