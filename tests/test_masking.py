"""Specification of the masked-LM objective: BERT's 15% / 80-10-10 masking and a short BERT run."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.data.tokenizers import WordPieceTokenizer
from minformer.training.objectives import MaskedLMObjective, bert_segments, mask_tokens

from conftest import overrides_dict

# Ids 0..4 are special ([PAD], [UNK], [CLS], [SEP], [MASK]), as WordPieceTokenizer.train assigns them.
PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL_IDS = [PAD, UNK, CLS, SEP, MASK]
VOCAB_SIZE = 1000


def masking(input_ids: torch.Tensor, seed: int, probability: float = 0.15):
    generator = torch.Generator().manual_seed(seed)
    return mask_tokens(input_ids, SPECIAL_IDS, MASK, VOCAB_SIZE, probability, generator)


def ordinary_batch(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``[CLS] ordinary ids [SEP]`` rows with ids >= 5."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(5, VOCAB_SIZE, (batch, seq - 2), generator=generator)
    return torch.cat([torch.full((batch, 1), CLS), body, torch.full((batch, 1), SEP)], dim=1)


def test_masking_proportions_match_bert():
    input_ids = ordinary_batch(200, 502)  # 100,000 ordinary tokens
    inputs, labels = masking(input_ids, seed=1)
    chosen = labels != -100
    n_chosen = int(chosen.sum())
    as_mask = int((inputs[chosen] == MASK).sum())
    unchanged = int((inputs[chosen] == input_ids[chosen]).sum())
    replaced = n_chosen - as_mask - unchanged

    # Binomial standard deviations: 0.0011 for the chosen share, about 0.004 and 0.003 for the splits.
    assert abs(n_chosen / 100_000 - 0.15) < 0.006
    assert abs(as_mask / n_chosen - 0.8) < 0.015
    assert abs(replaced / n_chosen - 0.1) < 0.012
    # A random replacement can draw the original id (1 in 995), so "unchanged" is slightly above 10%.
    assert abs(unchanged / n_chosen - 0.1) < 0.012


def test_labels_only_at_chosen_positions_and_hold_originals():
    input_ids = ordinary_batch(8, 64)
    inputs, labels = masking(input_ids, seed=2)
    chosen = labels != -100
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(inputs[~chosen], input_ids[~chosen])


def test_random_replacements_are_never_special():
    input_ids = ordinary_batch(50, 200)
    inputs, labels = masking(input_ids, seed=3)
    replaced = (labels != -100) & (inputs != MASK) & (inputs != input_ids)
    assert bool(replaced.any())
    assert not bool(torch.isin(inputs[replaced], torch.tensor(SPECIAL_IDS)).any())


def test_masking_is_deterministic_under_seed():
    input_ids = ordinary_batch(4, 50)
    first = masking(input_ids, seed=5)
    again = masking(input_ids, seed=5)
    other = masking(input_ids, seed=6)
    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_batch_without_chosen_token_gets_one():
    input_ids = ordinary_batch(1, 6)
    _, labels = masking(input_ids, seed=0, probability=1e-9)
    assert int((labels != -100).sum()) == 1


@settings(deadline=None, max_examples=60)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    probability=st.floats(min_value=0.05, max_value=0.95),
    specials_inside=st.lists(st.sampled_from(SPECIAL_IDS), max_size=5),
)
def test_special_and_padding_never_chosen(lengths, seed, probability, specials_inside):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + 2
    input_ids = torch.full((len(lengths), width), PAD)
    for row, length in enumerate(lengths):
        body = torch.randint(5, VOCAB_SIZE, (length,), generator=generator)
        for offset, special in enumerate(specials_inside[:length]):
            body[offset * 3 % max(length, 1)] = special
        input_ids[row, : length + 2] = torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])])

    inputs, labels = mask_tokens(input_ids, SPECIAL_IDS, MASK, VOCAB_SIZE, probability, generator)
    special = torch.isin(input_ids, torch.tensor(SPECIAL_IDS))

    assert bool((labels[special] == -100).all())
    assert torch.equal(inputs[special], input_ids[special])
    assert torch.equal(labels[labels != -100], input_ids[labels != -100])


def test_bert_segments_wrap_and_pad():
    input_ids, attention_mask = bert_segments(np.arange(10, 17), body_length=3, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    assert input_ids.tolist() == [[CLS, 10, 11, 12, SEP], [CLS, 13, 14, 15, SEP], [CLS, 16, SEP, PAD, PAD]]
    assert attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]


def test_eval_masking_fixed_training_dynamic():
    tokenizer = WordPieceTokenizer.train(["the king and the queen of the night"] * 20, vocab_size=60)
    pieces = np.asarray(tokenizer.encode_pieces("the king and the queen of the night " * 30))
    first = MaskedLMObjective(pieces, [pieces[:40], pieces[:7]], tokenizer, context=16, batch_size=4, seed=0, mask_probability=0.15)
    second = MaskedLMObjective(pieces, [pieces[:40], pieces[:7]], tokenizer, context=16, batch_size=4, seed=1, mask_probability=0.15)

    assert torch.equal(first.val_labels, second.val_labels)
    padding = first.val_attention_mask == 0
    assert bool(padding.any())
    assert bool((first.val_labels[padding] == -100).all())
    batch_one, batch_two = first.next_batch(), first.next_batch()
    assert not torch.equal(batch_one["targets"], batch_two["targets"])
    assert bool((batch_one["input_ids"][:, 0] == tokenizer.cls_id).all())
    assert bool((batch_one["input_ids"][:, -1] == tokenizer.sep_id).all())


def test_objective_state_round_trip_repeats_batches():
    tokenizer = WordPieceTokenizer.train(["the king and the queen of the night"] * 20, vocab_size=60)
    pieces = np.asarray(tokenizer.encode_pieces("the king and the queen of the night " * 30))
    objective = MaskedLMObjective(pieces, [pieces[:40]], tokenizer, context=16, batch_size=4, seed=0, mask_probability=0.15)
    state = objective.get_state()
    first = objective.next_batch()
    objective.set_state(state)
    again = objective.next_batch()
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["targets"], again["targets"])


def test_bert_tiny_masked_lm_run_trains(tiny_env, tmp_path, one_thread):
    from minformer.runs import load
    from minformer.training.config import load_run_config
    from minformer.training.trainer import Trainer

    overrides = overrides_dict([
        "--model.vocab_size=null", "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.d_ff=64",
        "--model.max_seq_len=24", "--tokenizer.kind=wordpiece", "--tokenizer.vocab_size=300",
        "--objective.kind=masked_lm", "--train.batch_size=4", "--train.max_steps=6", "--train.eval_interval=3",
        "--train.log_interval=1", "--train.checkpoint_interval=0", "--data.corpus=tiny", "--train.device=cpu",
    ])
    trainer = Trainer(load_run_config("bert-tiny", overrides), tmp_path / "run")
    records = []
    trainer.on_log = records.append
    trainer.run()
    val_loss, val_targets, _ = trainer.evaluate()
    model, tokenizer = load(tmp_path / "run")

    assert all(0.0 <= record["masked_accuracy"] <= 1.0 for record in records)
    assert "val_loss_estimate" in records[-1]
    assert val_targets > 0
    assert np.isfinite(val_loss)
    assert isinstance(tokenizer, WordPieceTokenizer)
    assert type(model).__name__ == "BERTForMaskedLM"


def test_wordpiece_train_assigns_special_ids_and_round_trips(tmp_path):
    from minformer.data.tokenizers import load_tokenizer

    tokenizer = WordPieceTokenizer.train(["The King, and the Queen of the night."] * 20, vocab_size=60)
    reloaded = load_tokenizer(tokenizer.save(tmp_path))
    ids = tokenizer.encode("the king, the queen")

    assert tokenizer.special_ids == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 2, 3, 4)
    assert ids[0] == tokenizer.cls_id
    assert ids[-1] == tokenizer.sep_id
    assert tokenizer.encode_pieces("the king, the queen") == ids[1:-1]
    assert reloaded.encode("the king, the queen") == ids
    assert tokenizer.decode(ids) == "[CLS] the king, the queen [SEP]"
    assert tokenizer.encode("zebra")[1:-1] == [tokenizer.unk_id]
