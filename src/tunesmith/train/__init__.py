"""Training: SFT with LoRA (or full) through TRL, metrics and progress callbacks."""
