"""Model families (GPT-2, LLaMA), their presets and the Hugging Face weight mapping."""
