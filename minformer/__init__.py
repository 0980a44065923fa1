"""minformer: the Transformer family built from scratch in PyTorch."""

from minformer.models import BERT, GPT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification, GPTConfig
from minformer.runs import load

__version__ = "0.1.0"


def from_hf(directory):
    """Build a minformer model from a Hugging Face checkpoint directory (dispatches on config.json)."""
    from minformer.interop import from_hf as _from_hf

    return _from_hf(directory)


def to_hf(model, directory, tokenizer=None):
    """Write ``model`` as a Hugging Face checkpoint directory (config.json and model.safetensors),
    and ``tokenizer.json`` when a tokenizer is given."""
    from minformer.interop import to_hf as _to_hf

    return _to_hf(model, directory, tokenizer)


__all__ = [
    "BERT",
    "BERTConfig",
    "BERTForMaskedLM",
    "BERTForSequenceClassification",
    "GPT",
    "GPTConfig",
    "from_hf",
    "load",
    "to_hf",
]
