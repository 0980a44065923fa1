"""``minformer train --init-from HF_DIR``: the run starts from the checkpoint's weights and tokenizer."""

from __future__ import annotations

import pytest
import torch

from minformer.data.tokenizers import BPETokenizer
from tests.conftest import TINY_OVERRIDES, overrides_dict, tiny_text

transformers = pytest.importorskip("transformers")

from minformer.training.config import load_run_config  # noqa: E402
from minformer.training.trainer import Trainer  # noqa: E402


def write_hf_gpt2_with_tokenizer(directory):
    """A tiny GPT-2 in Hugging Face layout with a byte-level BPE tokenizer trained on the tiny text."""
    tokenizer = BPETokenizer.train([tiny_text()], vocab_size=300)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=tokenizer.vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(directory / "tokenizer.json")
    return model, tokenizer


def test_init_from_starts_at_checkpoint_weights(tiny_env, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    reference, tokenizer = write_hf_gpt2_with_tokenizer(hf_dir)
    raw = load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES + ["--train.max_steps=1"]))

    trainer = Trainer(raw, tmp_path / "run", init_from=hf_dir)
    input_ids = torch.tensor([tokenizer.encode("The king and the queen.")])

    assert trainer.config.model.d_model == 32
    assert trainer.config.model.vocab_size == tokenizer.vocab_size
    assert trainer.tokenizer.encode("The king") == tokenizer.encode("The king")
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.model.eval()(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=1e-5
        )


def test_init_from_run_trains_and_reloads(tiny_env, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_hf_gpt2_with_tokenizer(hf_dir)
    raw = load_run_config("gpt-tiny", overrides_dict(TINY_OVERRIDES + ["--train.max_steps=2"]))

    result = Trainer(raw, tmp_path / "run", init_from=hf_dir).run()

    assert result.steps_done == 2
    assert (tmp_path / "run" / "tokenizer.json").is_file()
