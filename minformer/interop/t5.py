"""Import and export of Hugging Face T5 checkpoints (``T5ForConditionalGeneration``, T5 v1.0 and v1.1).

Hugging Face T5 keeps the names of the Mesh TensorFlow release: ``encoder.block.N.layer.0.SelfAttention.q``,
``layer.1.DenseReluDense.wi``, with the relative bias table in block 0 of each stack only. The
decoder's sub-layers are ``layer.0`` (self-attention), ``layer.1`` (``EncDecAttention``) and
``layer.2`` (feed-forward). The gated feed-forward's ``wi_0`` is the activated branch and ``wi_1``
the linear one. Config keys are translated by ``CONFIG_NAME_MAP``; an option that one side cannot
express raises a ``ValueError`` naming it.

transformers 5.x writes every T5 checkpoint with ``tie_word_embeddings: true`` and records the
v1.0 rescaling as ``scale_decoder_outputs``; a checkpoint without ``lm_head.weight`` then shares
``shared.weight`` as its head. Older v1.1 checkpoints store ``tie_word_embeddings: false`` and
their own ``lm_head.weight``. Both load here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minformer.interop.files import read_hf_config, read_hf_tensors, write_hf_checkpoint
from minformer.models.t5 import T5, T5Config

MODEL_TYPE = "t5"
ARCHITECTURES = ("T5ForConditionalGeneration",)

# Values T5Config takes for keys a config.json leaves out (transformers 5.25,
# models/t5/configuration_t5.py).
HF_DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": None,
}

# Hugging Face T5 config key -> T5Config field.
CONFIG_NAME_MAP = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "d_kv": "d_head",
    "d_ff": "d_ff",
    "num_layers": "n_encoder_layers",
    "num_decoder_layers": "n_decoder_layers",
    "num_heads": "n_heads",
    "relative_attention_num_buckets": "t5_num_buckets",
    "relative_attention_max_distance": "t5_max_distance",
    "dropout_rate": "dropout",
    "layer_norm_epsilon": "norm_eps",
    "initializer_factor": "init_factor",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
}

# Hugging Face feed_forward_proj -> T5Config.activation, only where both compute the same function.
# transformers maps "gated-gelu" to gelu_new, the tanh approximation.
ACTIVATIONS_FROM_HF = {
    "relu": "relu",
    "gated-gelu": "geglu_tanh",
    "gated-gelu_new": "geglu_tanh",
    "gated-gelu_pytorch_tanh": "geglu_tanh",
    "gated-relu": "reglu",
    "gated-silu": "swiglu",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
}
ACTIVATIONS_TO_HF = {
    "relu": "relu",
    "geglu_tanh": "gated-gelu",
    "reglu": "gated-relu",
    "swiglu": "gated-silu",
    "gelu_tanh": "gelu_new",
    "silu": "silu",
}

ENCODER_SUBLAYERS = (("attn", "layer.0.SelfAttention"),)
DECODER_SUBLAYERS = (("attn", "layer.0.SelfAttention"), ("cross_attn", "layer.1.EncDecAttention"))
ATTENTION_PROJECTIONS = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o"))


def t5_config_from_hf_dict(hf_config: dict) -> T5Config:
    """Translate a T5 ``config.json`` dict into a ``T5Config``, raising ``ValueError`` on options T5Config lacks."""
    values = {**HF_DEFAULTS, **{key: value for key, value in hf_config.items() if key in HF_DEFAULTS}}
    if values["num_decoder_layers"] is None:
        values["num_decoder_layers"] = values["num_layers"]
    if isinstance(values["eos_token_id"], list):
        if len(values["eos_token_id"]) != 1:
            raise ValueError(f"T5 config eos_token_id={values['eos_token_id']!r} has no equivalent; T5Config takes one id.")
        values["eos_token_id"] = values["eos_token_id"][0]

    projection = values["feed_forward_proj"]
    if projection not in ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"T5 config feed_forward_proj={projection!r} has no minformer equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_FROM_HF)}."
        )

    fields = {field: values[key] for key, field in CONFIG_NAME_MAP.items()}
    fields["activation"] = ACTIVATIONS_FROM_HF[projection]
    fields["tie_embeddings"] = rescales_decoder_output(hf_config)
    if fields["pad_token_id"] is None:
        fields["pad_token_id"] = 0
    start = values["decoder_start_token_id"]
    fields["decoder_start_token_id"] = fields["pad_token_id"] if start is None else start
    return T5Config(**fields)


def rescales_decoder_output(hf_config: dict) -> bool:
    """Return whether the checkpoint multiplies the decoder output by d_model^-0.5 (T5 v1.0).

    transformers 5.x writes ``scale_decoder_outputs``; earlier versions derive it from
    ``tie_word_embeddings``, which v1.1 checkpoints set to false.
    """
    if "scale_decoder_outputs" in hf_config:
        return bool(hf_config["scale_decoder_outputs"])
    return hf_config.get("tie_word_embeddings", True) is not False


def t5_config_from_hf(directory: str | Path) -> T5Config:
    """Read ``directory/config.json`` of a T5 checkpoint as a ``T5Config``."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{Path(directory) / 'config.json'} has model_type={hf_config.get('model_type')!r}, expected 't5'.")
    return t5_config_from_hf_dict(hf_config)


def hf_config_from_t5_config(config: T5Config) -> dict:
    """Translate a ``T5Config`` into a T5 ``config.json`` dict, raising ``ValueError`` on options T5 lacks."""
    if config.norm != "rmsnorm":
        raise ValueError(f"T5Config norm={config.norm!r} has no Hugging Face T5 equivalent; T5 needs norm='rmsnorm'.")
    if config.activation not in ACTIVATIONS_TO_HF:
        raise ValueError(
            f"T5Config activation={config.activation!r} has no Hugging Face T5 equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_TO_HF)}."
        )
    hf_config = {key: getattr(config, field) for key, field in CONFIG_NAME_MAP.items()}
    hf_config["feed_forward_proj"] = ACTIVATIONS_TO_HF[config.activation]
    hf_config["decoder_start_token_id"] = config.decoder_start_token_id
    # Both keys, so that transformers 5.x (which reads the second) and earlier versions agree.
    hf_config["tie_word_embeddings"] = config.tie_embeddings
    hf_config["scale_decoder_outputs"] = config.tie_embeddings
    hf_config["is_encoder_decoder"] = True
    hf_config["model_type"] = MODEL_TYPE
    hf_config["architectures"] = list(ARCHITECTURES)
    return hf_config


def tensor_name_pairs(config: T5Config) -> list[tuple[str, str]]:
    """Return (our state-dict name, Hugging Face name) for every tensor but the LM head."""
    pairs = [("shared.weight", "shared.weight")]
    for stack, n_layers, sublayers in (
        ("encoder", config.n_encoder_layers, ENCODER_SUBLAYERS),
        ("decoder", config.n_decoder_layers, DECODER_SUBLAYERS),
    ):
        pairs.append(
            (f"{stack}.relative_bias.relative_attention_bias.weight",
             f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        )
        for layer in range(n_layers):
            ours, theirs = f"{stack}.blocks.{layer}.", f"{stack}.block.{layer}."
            for our_attention, hf_attention in sublayers:
                for our_projection, hf_projection in ATTENTION_PROJECTIONS:
                    pairs.append((f"{ours}{our_attention}.{our_projection}.weight", f"{theirs}{hf_attention}.{hf_projection}.weight"))
            pairs.append((f"{ours}attn_norm.weight", f"{theirs}layer.0.layer_norm.weight"))
            if stack == "decoder":
                pairs.append((f"{ours}cross_norm.weight", f"{theirs}layer.1.layer_norm.weight"))
            ffn_layer = "layer.2" if stack == "decoder" else "layer.1"
            pairs.append((f"{ours}ffn_norm.weight", f"{theirs}{ffn_layer}.layer_norm.weight"))
            if config.activation in ("relu", "gelu_tanh", "silu"):
                pairs.append((f"{ours}ffn.fc_in.weight", f"{theirs}{ffn_layer}.DenseReluDense.wi.weight"))
            else:
                pairs.append((f"{ours}ffn.fc_gate.weight", f"{theirs}{ffn_layer}.DenseReluDense.wi_0.weight"))
                pairs.append((f"{ours}ffn.fc_in.weight", f"{theirs}{ffn_layer}.DenseReluDense.wi_1.weight"))
            pairs.append((f"{ours}ffn.fc_out.weight", f"{theirs}{ffn_layer}.DenseReluDense.wo.weight"))
        pairs.append((f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight"))
    return pairs


# Tensors that carry no weights of ours: copies of the shared embedding that some versions save.
IGNORED_NAMES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def check_hf_tensors(hf_tensors: dict[str, torch.Tensor], model: T5, pairs: list[tuple[str, str]], source: str) -> None:
    """Raise ``ValueError`` naming any missing, unexpected or misshapen tensor."""
    state = model.state_dict()
    expected = {theirs: tuple(state[ours].shape) for ours, theirs in pairs}
    missing = sorted(set(expected) - set(hf_tensors))
    unexpected = sorted(set(hf_tensors) - set(expected) - set(IGNORED_NAMES) - {"lm_head.weight"})
    if missing:
        raise ValueError(f"{source} is missing tensors {missing[:5]} (of {len(missing)}) that its config.json implies.")
    if unexpected:
        raise ValueError(f"{source} has tensors {unexpected[:5]} (of {len(unexpected)}) that a T5 lacks.")
    for name, shape in expected.items():
        if tuple(hf_tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(hf_tensors[name].shape)}, but config.json implies {shape}.")


def load_t5(directory: str | Path) -> T5:
    """Build a ``T5`` from a ``T5ForConditionalGeneration`` checkpoint, in eval mode, with fp32 parameters."""
    directory = Path(directory)
    config = t5_config_from_hf(directory)
    hf_tensors = read_hf_tensors(directory)
    model = T5(config)
    pairs = tensor_name_pairs(config)
    check_hf_tensors(hf_tensors, model, pairs, str(directory))

    state = {ours: hf_tensors[theirs] for ours, theirs in pairs}
    # A head-less checkpoint shares the embedding as its head (see the module docstring).
    state["lm_head.weight"] = hf_tensors.get("lm_head.weight", hf_tensors["shared.weight"])
    if config.tie_embeddings and "lm_head.weight" in hf_tensors and not torch.equal(hf_tensors["lm_head.weight"], hf_tensors["shared.weight"]):
        raise ValueError(
            f"{directory} rescales the decoder output like T5 v1.0 but has an lm_head.weight that differs from "
            "shared.weight; T5Config ties the head whenever it rescales."
        )
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def save_t5(model: T5, directory: str | Path) -> Path:
    """Write ``model`` as a ``T5ForConditionalGeneration`` checkpoint (config.json, model.safetensors) in ``directory``."""
    hf_config = hf_config_from_t5_config(model.config)
    state = model.state_dict()
    hf_tensors = {theirs: state[ours].detach().cpu().contiguous() for ours, theirs in tensor_name_pairs(model.config)}
    if not model.config.tie_embeddings:
        hf_tensors["lm_head.weight"] = state["lm_head.weight"].detach().cpu().contiguous()
    return write_hf_checkpoint(directory, hf_config, hf_tensors)
