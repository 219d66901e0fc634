"""Command-line tools (`python -m rlhf_jax.tools.NAME`): generate, score, best_of_k, convert,
convert_data, bench."""
