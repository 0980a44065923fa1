"""Import and export of Hugging Face BERT checkpoints (``BertModel``, ``BertForMaskedLM``,
``BertForSequenceClassification``).

Hugging Face BERT keeps the names of Google's TensorFlow release: ``encoder.layer.N.attention.self.query``,
``attention.output.LayerNorm``, ``intermediate.dense`` and so on, under a ``bert.`` prefix in the
task models. Checkpoints converted from TensorFlow by older tools name LayerNorm parameters
``gamma`` and ``beta`` instead of ``weight`` and ``bias``; both spellings load. Config keys are
translated by ``CONFIG_NAME_MAP`` and tensors by ``tensor_name_pairs``. An option that one side
cannot express raises a ``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minformer.interop.files import read_hf_config, read_hf_tensors, write_hf_checkpoint
from minformer.models.bert import BERT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification

MODEL_TYPE = "bert"
ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")

# Hugging Face architecture name <-> minformer class.
MODEL_CLASSES = {
    "BertModel": BERT,
    "BertForMaskedLM": BERTForMaskedLM,
    "BertForSequenceClassification": BERTForSequenceClassification,
}

# Values BertConfig takes for keys a config.json leaves out (transformers 5.25,
# models/bert/configuration_bert.py).
HF_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "classifier_dropout": None,
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# Hugging Face BERT config key -> BERTConfig field. The two dropout rates share one field, so an
# import requires them to be equal.
CONFIG_NAME_MAP = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "d_ff",
    "hidden_act": "activation",
    "layer_norm_eps": "norm_eps",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
    "hidden_dropout_prob": "dropout",
    "attention_probs_dropout_prob": "dropout",
    "initializer_range": "init_std",
}
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")

# Hugging Face hidden_act -> BERTConfig.activation, only where both compute the same function.
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

# Hugging Face options BERT cannot express, with the one value our computation matches.
HF_REQUIRED_VALUES = {
    "position_embedding_type": "absolute",  # relative_key variants add distance embeddings to the scores
    "is_decoder": False,  # True makes the self-attention causal
    "add_cross_attention": False,  # True adds cross-attention weights that an encoder lacks
    "tie_word_embeddings": True,  # False gives the masked-LM decoder its own matrix
}

HF_PREFIX = "bert."
LEGACY_SUFFIXES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
# Tensors that carry no weights of our models: the saved position-id buffer, the next-sentence
# prediction head of pretraining checkpoints, and the masked-LM decoder, which is tied to the word
# embeddings (its bias duplicates cls.predictions.bias).
IGNORED_NAMES = (
    "embeddings.position_ids",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)


def bert_config_from_hf_dict(hf_config: dict) -> BERTConfig:
    """Translate a BERT ``config.json`` dict into a ``BERTConfig``, raising ``ValueError`` on options BERT lacks."""
    values = {**HF_DEFAULTS, **{key: value for key, value in hf_config.items() if key in HF_DEFAULTS}}

    for key, required in HF_REQUIRED_VALUES.items():
        if values[key] != required:
            raise ValueError(
                f"BERT config {key}={values[key]!r} has no minformer equivalent; only {key}={required!r} can be imported."
            )

    dropouts = {key: values[key] for key in DROPOUT_KEYS}
    if values["classifier_dropout"] is not None:
        dropouts["classifier_dropout"] = values["classifier_dropout"]
    if len(set(dropouts.values())) != 1:
        raise ValueError(
            f"BERT config has different dropout rates {dropouts}, but BERTConfig has one dropout field; "
            "set them to the same value in config.json."
        )

    activation = values["hidden_act"]
    if activation not in ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"BERT config hidden_act={activation!r} has no minformer equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_FROM_HF)}."
        )

    fields = {field: values[key] for key, field in CONFIG_NAME_MAP.items()}
    fields["activation"] = ACTIVATIONS_FROM_HF[activation]
    if fields["pad_token_id"] is None:
        fields["pad_token_id"] = 0
    fields["n_labels"] = n_labels_from_hf(hf_config)
    return BERTConfig(**fields)


def n_labels_from_hf(hf_config: dict) -> int:
    """Return the number of classes: the size of ``id2label``, else ``num_labels``, else 2 (BertConfig's default)."""
    id2label = hf_config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(hf_config.get("num_labels", 2))


def bert_config_from_hf(directory: str | Path) -> BERTConfig:
    """Read ``directory/config.json`` of a BERT checkpoint as a ``BERTConfig``."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{Path(directory) / 'config.json'} has model_type={hf_config.get('model_type')!r}, expected 'bert'.")
    return bert_config_from_hf_dict(hf_config)


def architecture_of(hf_config: dict, directory: Path) -> str:
    """Return the one supported architecture config.json names, ``BertModel`` when it names none."""
    architectures = hf_config.get("architectures") or ["BertModel"]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ValueError(
            f"{directory / 'config.json'} lists architectures {architectures}; expected one of {', '.join(ARCHITECTURES)}."
        )
    return architectures[0]


def hf_config_from_bert_config(config: BERTConfig, architecture: str) -> dict:
    """Translate a ``BERTConfig`` into a BERT ``config.json`` dict, raising ``ValueError`` on options BERT lacks."""
    if config.norm != "layernorm":
        raise ValueError(f"BERTConfig norm={config.norm!r} has no Hugging Face BERT equivalent; BERT needs norm='layernorm'.")
    if config.d_head * config.n_heads != config.d_model:
        raise ValueError(
            f"BERTConfig d_head={config.d_head} with n_heads={config.n_heads} does not fill d_model={config.d_model}; "
            "Hugging Face BERT fixes d_head = d_model // n_heads."
        )
    if config.activation not in ACTIVATIONS_TO_HF:
        raise ValueError(
            f"BERTConfig activation={config.activation!r} has no Hugging Face BERT equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_TO_HF)}."
        )

    hf_config = {key: getattr(config, field) for key, field in CONFIG_NAME_MAP.items()}
    hf_config["hidden_act"] = ACTIVATIONS_TO_HF[config.activation]
    hf_config.update(HF_REQUIRED_VALUES)
    hf_config["classifier_dropout"] = None
    hf_config["id2label"] = {str(index): f"LABEL_{index}" for index in range(config.n_labels)}
    hf_config["label2id"] = {f"LABEL_{index}": index for index in range(config.n_labels)}
    hf_config["model_type"] = MODEL_TYPE
    hf_config["architectures"] = [architecture]
    return hf_config


def tensor_name_pairs(config: BERTConfig, with_pooler: bool) -> list[tuple[str, str]]:
    """Return (our name in ``BERT``, Hugging Face name without the prefix) for every encoder tensor."""
    pairs = [
        ("embeddings.word_embedding.weight", "embeddings.word_embeddings.weight"),
        ("embeddings.position_embedding.weight", "embeddings.position_embeddings.weight"),
        ("embeddings.token_type_embedding.weight", "embeddings.token_type_embeddings.weight"),
        ("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
        ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
    ]
    for layer in range(config.n_layers):
        ours, theirs = f"blocks.{layer}.", f"encoder.layer.{layer}."
        for our_module, hf_module in (
            ("attn.q_proj", "attention.self.query"),
            ("attn.k_proj", "attention.self.key"),
            ("attn.v_proj", "attention.self.value"),
            ("attn.out_proj", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),
            ("ffn.fc_in", "intermediate.dense"),
            ("ffn.fc_out", "output.dense"),
            ("ffn_norm", "output.LayerNorm"),
        ):
            for parameter in ("weight", "bias"):
                pairs.append((f"{ours}{our_module}.{parameter}", f"{theirs}{hf_module}.{parameter}"))
    if with_pooler:
        pairs += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
    return pairs


def model_name_pairs(model_class: type[nn.Module], config: BERTConfig, with_pooler: bool) -> list[tuple[str, str]]:
    """Return (our state-dict name, full Hugging Face name) for every tensor of ``model_class``."""
    if model_class is BERT:
        return tensor_name_pairs(config, with_pooler)
    pairs = [(f"bert.{ours}", HF_PREFIX + theirs) for ours, theirs in tensor_name_pairs(config, with_pooler)]
    if model_class is BERTForMaskedLM:
        pairs += [
            ("mlm_head.dense.weight", "cls.predictions.transform.dense.weight"),
            ("mlm_head.dense.bias", "cls.predictions.transform.dense.bias"),
            ("mlm_head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
            ("mlm_head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
            ("mlm_head.bias", "cls.predictions.bias"),
        ]
    else:
        pairs += [("classifier.weight", "classifier.weight"), ("classifier.bias", "classifier.bias")]
    return pairs


def normalize_names(hf_tensors: dict[str, torch.Tensor], model_class: type[nn.Module]) -> dict[str, torch.Tensor]:
    """Rename legacy ``gamma``/``beta`` parameters, drop ignored tensors, and give encoder names the
    ``bert.`` prefix that ``model_class`` expects (none for ``BERT``)."""
    normalized = {}
    for name, tensor in hf_tensors.items():
        for legacy, current in LEGACY_SUFFIXES.items():
            if name.endswith(legacy):
                name = name[: -len(legacy)] + current
        short_name = name.removeprefix(HF_PREFIX)
        if short_name in IGNORED_NAMES:
            continue
        is_head = short_name.startswith(("cls.", "classifier."))
        name = short_name if model_class is BERT or is_head else HF_PREFIX + short_name
        if name in normalized:
            raise ValueError(f"Tensor {name} appears twice (with and without the {HF_PREFIX!r} prefix, or in legacy spelling).")
        normalized[name] = tensor
    return normalized


def check_hf_tensors(hf_tensors: dict[str, torch.Tensor], model: nn.Module, pairs: list[tuple[str, str]], source: str) -> None:
    """Raise ``ValueError`` naming any missing, unexpected or misshapen tensor."""
    state = model.state_dict()
    expected = {theirs: tuple(state[ours].shape) for ours, theirs in pairs}
    missing = sorted(set(expected) - set(hf_tensors))
    unexpected = sorted(set(hf_tensors) - set(expected))
    # A BertForMaskedLM checkpoint converted from a pretraining checkpoint still carries the pooler.
    if isinstance(model, BERTForMaskedLM):
        unexpected = [name for name in unexpected if not name.startswith(HF_PREFIX + "pooler.")]
    if missing:
        raise ValueError(f"{source} is missing tensors {missing[:5]} (of {len(missing)}) that its config.json implies.")
    if unexpected:
        raise ValueError(
            f"{source} has tensors {unexpected[:5]} (of {len(unexpected)}) that a {type(model).__name__} lacks."
        )
    for name, shape in expected.items():
        if tuple(hf_tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(hf_tensors[name].shape)}, but config.json implies {shape}.")


def load_bert(directory: str | Path) -> nn.Module:
    """Build the minformer BERT class that matches config.json's architecture, in eval mode, with fp32 parameters.

    A ``BertModel`` checkpoint without pooler weights (saved with ``add_pooling_layer=False``)
    becomes a ``BERT`` without a pooler.
    """
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    config = bert_config_from_hf(directory)
    model_class = MODEL_CLASSES[architecture_of(hf_config, directory)]
    hf_tensors = normalize_names(read_hf_tensors(directory), model_class)

    with_pooler = model_class is BERTForSequenceClassification or (
        model_class is BERT and "pooler.dense.weight" in hf_tensors
    )
    model = BERT(config, with_pooler=with_pooler) if model_class is BERT else model_class(config)
    pairs = model_name_pairs(model_class, config, with_pooler)
    check_hf_tensors(hf_tensors, model, pairs, str(directory))
    model.load_state_dict({ours: hf_tensors[theirs] for ours, theirs in pairs}, strict=True)
    return model.eval()


def save_bert(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` as the matching Hugging Face BERT checkpoint (config.json, model.safetensors) in ``directory``."""
    architecture = next(name for name, cls in MODEL_CLASSES.items() if type(model) is cls)
    encoder = model if isinstance(model, BERT) else model.bert
    if isinstance(model, BERT) and encoder.pooler is None:
        raise ValueError(
            "A BERT without a pooler has no BertModel config.json equivalent (transformers would add a random pooler); "
            "build it with with_pooler=True, or export the BERTForMaskedLM that contains it."
        )
    hf_config = hf_config_from_bert_config(model.config, architecture)
    state = model.state_dict()
    pairs = model_name_pairs(type(model), model.config, with_pooler=encoder.pooler is not None)
    hf_tensors = {theirs: state[ours].detach().cpu().contiguous() for ours, theirs in pairs}
    return write_hf_checkpoint(directory, hf_config, hf_tensors)
