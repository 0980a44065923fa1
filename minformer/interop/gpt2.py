"""Import and export of Hugging Face GPT-2 checkpoints (``GPT2LMHeadModel`` and ``GPT2Model``).

Hugging Face GPT-2 keeps the layout of OpenAI's release: its projections are ``Conv1D`` modules
whose weight is stored (in_features, out_features), the transpose of ``nn.Linear``, and each
block's ``attn.c_attn`` fuses the query, key and value projections along out_features in that
order. Config keys are translated by ``CONFIG_NAME_MAP`` and tensors by ``tensor_name_pairs``.
An option that one side cannot express raises a ``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minformer.interop.files import read_hf_config, read_hf_tensors, write_hf_checkpoint
from minformer.models.gpt import GPT, GPTConfig

MODEL_TYPE = "gpt2"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
EXPORT_ARCHITECTURE = "GPT2LMHeadModel"

# Values GPT2Config takes for keys a config.json leaves out (transformers 5.25,
# models/gpt2/configuration_gpt2.py). save_pretrained writes every key, but hand-written files may not.
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}

# Hugging Face GPT-2 config key -> GPTConfig field. The three dropout rates share one field, so an
# import requires them to be equal. activation_function values go through the activation tables.
CONFIG_NAME_MAP = {
    "vocab_size": "vocab_size",
    "n_positions": "max_seq_len",
    "n_embd": "d_model",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_inner": "d_ff",
    "activation_function": "activation",
    "layer_norm_epsilon": "norm_eps",
    "resid_pdrop": "dropout",
    "embd_pdrop": "dropout",
    "attn_pdrop": "dropout",
    "initializer_range": "init_std",
    "tie_word_embeddings": "tie_embeddings",
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

# Hugging Face activation_function -> GPTConfig.activation, only where both compute the same function:
# gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh approximation of GELU.
ACTIVATIONS_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# Hugging Face options GPT cannot express, with the one value GPT's computation matches.
HF_REQUIRED_VALUES = {
    "scale_attn_weights": True,  # False drops the 1/sqrt(head_dim) factor from the attention scores
    "scale_attn_by_inverse_layer_idx": False,  # True divides layer i's scores by i + 1 as well
    "add_cross_attention": False,  # True adds cross-attention weights that a decoder-only GPT lacks
}

# GPTConfig fields GPT-2 fixes, with the value it has.
GPT_REQUIRED_VALUES = {
    "norm": "layernorm",
    "norm_position": "pre",
    "position": "learned",
    "bias": True,
    "sliding_window": None,
    "moe_every": 0,
}

# Buffers that older transformers versions saved with each block (the causal mask and its fill
# value); they carry no weights and are dropped on import.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HF_PREFIX = "transformer."
LM_HEAD = "lm_head.weight"


def gpt_config_from_hf_dict(hf_config: dict) -> GPTConfig:
    """Translate a GPT-2 ``config.json`` dict into a ``GPTConfig``, raising ``ValueError`` on options GPT lacks."""
    values = {**HF_DEFAULTS, **{key: value for key, value in hf_config.items() if key in HF_DEFAULTS}}

    for key, required in HF_REQUIRED_VALUES.items():
        if values[key] != required:
            raise ValueError(
                f"GPT-2 config {key}={values[key]!r} has no minformer equivalent; only {key}={required!r} can be imported."
            )

    dropouts = {key: values[key] for key in DROPOUT_KEYS}
    if len(set(dropouts.values())) != 1:
        raise ValueError(
            f"GPT-2 config has different dropout rates {dropouts}, but GPTConfig has one dropout field; "
            "set resid_pdrop, embd_pdrop and attn_pdrop to the same value in config.json."
        )

    activation = values["activation_function"]
    if activation not in ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"GPT-2 config activation_function={activation!r} has no minformer equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_FROM_HF)}."
        )

    fields = {field: values[key] for key, field in CONFIG_NAME_MAP.items()}
    fields["activation"] = ACTIVATIONS_FROM_HF[activation]
    # reorder_and_upcast_attn only changes the precision in which fp16/bf16 scores are computed,
    # so a checkpoint with it loads as the same function.
    return GPTConfig(**fields, **GPT_REQUIRED_VALUES)


def gpt2_config_from_hf(directory: str | Path) -> GPTConfig:
    """Read ``directory/config.json`` of a GPT-2 checkpoint as a ``GPTConfig``."""
    hf_config = read_hf_config(directory)
    check_model_type(hf_config, Path(directory))
    return gpt_config_from_hf_dict(hf_config)


def check_model_type(hf_config: dict, directory: Path) -> None:
    """Raise ``ValueError`` unless the config describes a GPT-2 model with a supported architecture."""
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{directory / 'config.json'} has model_type={hf_config.get('model_type')!r}, expected 'gpt2'.")
    unsupported = [name for name in hf_config.get("architectures") or [] if name not in ARCHITECTURES]
    if unsupported:
        raise ValueError(
            f"{directory / 'config.json'} lists architectures {unsupported}; supported GPT-2 architectures: "
            f"{', '.join(ARCHITECTURES)}."
        )


def hf_config_from_gpt_config(config: GPTConfig) -> dict:
    """Translate a ``GPTConfig`` into a GPT-2 ``config.json`` dict, raising ``ValueError`` on options GPT-2 lacks."""
    for field, required in GPT_REQUIRED_VALUES.items():
        if getattr(config, field) != required:
            raise ValueError(
                f"GPTConfig {field}={getattr(config, field)!r} has no Hugging Face GPT-2 equivalent; "
                f"GPT-2 needs {field}={required!r}."
            )
    if config.n_kv_heads != config.n_heads:
        raise ValueError(
            f"GPTConfig n_kv_heads={config.n_kv_heads} differs from n_heads={config.n_heads}; "
            "Hugging Face GPT-2 has only multi-head attention (n_kv_heads == n_heads)."
        )
    if config.d_head * config.n_heads != config.d_model:
        raise ValueError(
            f"GPTConfig d_head={config.d_head} with n_heads={config.n_heads} does not fill d_model={config.d_model}; "
            "Hugging Face GPT-2 fixes d_head = d_model // n_heads."
        )
    if config.activation not in ACTIVATIONS_TO_HF:
        raise ValueError(
            f"GPTConfig activation={config.activation!r} has no Hugging Face GPT-2 equivalent; "
            f"supported values: {', '.join(ACTIVATIONS_TO_HF)}."
        )

    hf_config = {key: getattr(config, field) for key, field in CONFIG_NAME_MAP.items()}
    hf_config["activation_function"] = ACTIVATIONS_TO_HF[config.activation]
    hf_config.update(HF_REQUIRED_VALUES)
    hf_config["reorder_and_upcast_attn"] = False
    hf_config["model_type"] = MODEL_TYPE
    hf_config["architectures"] = [EXPORT_ARCHITECTURE]
    # NOTE: GPTConfig does not know the tokenizer, so no bos/eos ids are written. Generation with
    # transformers then never stops at an end-of-text token unless eos_token_id is added here.
    hf_config["bos_token_id"] = None
    hf_config["eos_token_id"] = None
    return hf_config


def tensor_name_pairs(config: GPTConfig) -> list[tuple[str, str]]:
    """Return (our state-dict name, Hugging Face name without the prefix) for each one-to-one tensor.

    The fused ``c_attn`` and the output layer are not listed, because they do not map one to one.
    """
    pairs = [
        ("token_embedding.weight", "wte.weight"),
        ("position_embedding.weight", "wpe.weight"),
        ("final_norm.weight", "ln_f.weight"),
        ("final_norm.bias", "ln_f.bias"),
    ]
    for layer in range(config.n_layers):
        ours, theirs = f"blocks.{layer}.", f"h.{layer}."
        for our_module, hf_module in (
            ("attn_norm", "ln_1"),
            ("attn.out_proj", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn.fc_in", "mlp.c_fc"),
            ("ffn.fc_out", "mlp.c_proj"),
        ):
            for parameter in ("weight", "bias"):
                pairs.append((f"{ours}{our_module}.{parameter}", f"{theirs}{hf_module}.{parameter}"))
    return pairs


def is_conv1d_weight(hf_name: str) -> bool:
    """Return True when ``hf_name`` is a ``Conv1D`` weight, stored (in_features, out_features)."""
    return hf_name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def expected_hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor a GPT-2 checkpoint of ``config`` holds, by name without the prefix."""
    width, inner = config.d_model, config.d_ff
    shapes = {"wte.weight": (config.vocab_size, width), "wpe.weight": (config.max_seq_len, width)}
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (width,)
    for layer in range(config.n_layers):
        prefix = f"h.{layer}."
        for norm in ("ln_1", "ln_2"):
            shapes[f"{prefix}{norm}.weight"] = shapes[f"{prefix}{norm}.bias"] = (width,)
        shapes[f"{prefix}attn.c_attn.weight"] = (width, 3 * width)
        shapes[f"{prefix}attn.c_attn.bias"] = (3 * width,)
        shapes[f"{prefix}attn.c_proj.weight"] = (width, width)
        shapes[f"{prefix}attn.c_proj.bias"] = (width,)
        shapes[f"{prefix}mlp.c_fc.weight"] = (width, inner)
        shapes[f"{prefix}mlp.c_fc.bias"] = (inner,)
        shapes[f"{prefix}mlp.c_proj.weight"] = (inner, width)
        shapes[f"{prefix}mlp.c_proj.bias"] = (width,)
    if not config.tie_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, width)
    return shapes


def strip_prefix(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``transformer.`` prefix of ``GPT2LMHeadModel`` names and the saved attention-mask buffers."""
    stripped = {}
    for name, tensor in hf_tensors.items():
        short_name = name.removeprefix(HF_PREFIX)
        if short_name.startswith("h.") and short_name.endswith(IGNORED_SUFFIXES):
            continue
        if short_name in stripped:
            raise ValueError(f"Tensor {short_name} appears both with and without the {HF_PREFIX!r} prefix.")
        stripped[short_name] = tensor
    return stripped


def check_hf_tensors(hf_tensors: dict[str, torch.Tensor], config: GPTConfig, source: str) -> None:
    """Raise ``ValueError`` naming any missing, unexpected or misshapen tensor."""
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(hf_tensors))
    # A tied checkpoint may still contain lm_head.weight; transformers ignores it there, and so do we.
    unexpected = sorted(set(hf_tensors) - set(expected) - {LM_HEAD})
    if missing:
        raise ValueError(f"{source} is missing tensors {missing[:5]} (of {len(missing)}) that its config.json implies.")
    if unexpected:
        raise ValueError(
            f"{source} has tensors {unexpected[:5]} (of {len(unexpected)}) that a GPT-2 model of its config.json lacks."
        )
    for name, shape in expected.items():
        if tuple(hf_tensors[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(hf_tensors[name].shape)}, but config.json implies {shape}."
            )


def gpt_state_from_hf(hf_tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename, transpose and split checked GPT-2 tensors into a GPT state dict."""
    state = {}
    for our_name, hf_name in tensor_name_pairs(config):
        tensor = hf_tensors[hf_name]
        state[our_name] = tensor.t() if is_conv1d_weight(hf_name) else tensor

    for layer in range(config.n_layers):
        fused_weight = hf_tensors[f"h.{layer}.attn.c_attn.weight"].t()  # (3 * d_model, d_model)
        fused_bias = hf_tensors[f"h.{layer}.attn.c_attn.bias"]  # (3 * d_model,)
        for projection, weight, bias in zip(
            ("q_proj", "k_proj", "v_proj"), fused_weight.chunk(3, dim=0), fused_bias.chunk(3, dim=0)
        ):
            state[f"blocks.{layer}.attn.{projection}.weight"] = weight
            state[f"blocks.{layer}.attn.{projection}.bias"] = bias

    head = LM_HEAD if not config.tie_embeddings else "wte.weight"
    state["lm_head.weight"] = hf_tensors[head]
    return state


def hf_tensors_from_gpt_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename, transpose and fuse a GPT state dict into ``GPT2LMHeadModel`` tensors (with the prefix)."""
    hf_tensors = {}
    for our_name, hf_name in tensor_name_pairs(config):
        tensor = state[our_name]
        hf_tensors[hf_name] = tensor.t() if is_conv1d_weight(hf_name) else tensor

    for layer in range(config.n_layers):
        projections = [state[f"blocks.{layer}.attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")]
        biases = [state[f"blocks.{layer}.attn.{name}.bias"] for name in ("q_proj", "k_proj", "v_proj")]
        hf_tensors[f"h.{layer}.attn.c_attn.weight"] = torch.cat(projections, dim=0).t()  # (d_model, 3 * d_model)
        hf_tensors[f"h.{layer}.attn.c_attn.bias"] = torch.cat(biases, dim=0)

    prefixed = {HF_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in hf_tensors.items()}
    # A tied output layer is left out: transformers ties lm_head.weight to wte.weight on load.
    if not config.tie_embeddings:
        prefixed[LM_HEAD] = state["lm_head.weight"].detach().cpu().contiguous()
    return prefixed


def load_gpt2(directory: str | Path) -> GPT:
    """Build a ``GPT`` from a GPT-2 checkpoint directory, in eval mode, with fp32 parameters.

    Weights of another dtype (fp16, bf16) are converted to fp32 when copied into the model.
    """
    directory = Path(directory)
    config = gpt2_config_from_hf(directory)
    hf_tensors = strip_prefix(read_hf_tensors(directory))
    check_hf_tensors(hf_tensors, config, str(directory))

    model = GPT(config)
    model.load_state_dict(gpt_state_from_hf(hf_tensors, config), strict=True)
    return model.eval()


def save_gpt2(model: GPT, directory: str | Path) -> Path:
    """Write ``model`` as a ``GPT2LMHeadModel`` checkpoint (config.json, model.safetensors) in ``directory``."""
    hf_config = hf_config_from_gpt_config(model.config)
    hf_tensors = hf_tensors_from_gpt_state(model.state_dict(), model.config)
    return write_hf_checkpoint(directory, hf_config, hf_tensors)
