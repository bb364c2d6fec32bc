"""The Mamba-1 language model, its configs and checkpoint formats, hub loading and tokenizers."""
