"""Data: bundled multilingual corpus, tokenizer and the multitask DataModule."""
