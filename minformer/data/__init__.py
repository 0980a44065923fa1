"""Data for training: corpora, tokenizers, datasets and training objectives."""
