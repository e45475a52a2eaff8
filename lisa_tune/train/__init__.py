"""Training data loading, tokenization and the offline tokenizer for ``lisa-tune train``."""
