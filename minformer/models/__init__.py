"""Model families composed from minformer's components, and the registry that picks one by name."""

from minformer.models.bert import BERT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification
from minformer.models.gpt import GPT, GPTConfig, ModelOutput
from minformer.models.t5 import T5, T5Config
from minformer.models.transformer import Transformer, TransformerConfig

# family name -> (config class, model class); a run's config.yaml names its family. A BERT run
# pretrains with masked language modelling, so the family builds the masked-LM model.
FAMILIES = {
    "gpt": (GPTConfig, GPT),
    "bert": (BERTConfig, BERTForMaskedLM),
    "t5": (T5Config, T5),
    "transformer": (TransformerConfig, Transformer),
}


def config_from_dict(model_section: dict):
    """Build the config of the family named by ``model_section['family']``."""
    family = model_section.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is invalid; allowed values: {', '.join(map(repr, FAMILIES))}.")
    return FAMILIES[family][0].from_dict(model_section)


def build_model(config):
    """Build the model class that matches ``config``'s family."""
    return FAMILIES[config.family][1](config)


__all__ = [
    "BERT",
    "BERTConfig",
    "BERTForMaskedLM",
    "BERTForSequenceClassification",
    "FAMILIES",
    "GPT",
    "GPTConfig",
    "ModelOutput",
    "T5",
    "T5Config",
    "Transformer",
    "TransformerConfig",
    "build_model",
    "config_from_dict",
]
