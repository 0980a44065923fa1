"""KV cache: cached decoding equals the full forward pass for every position scheme and head layout.

Reference: the same model's uncached forward pass over the whole sequence. Greedy comparisons
assert a margin between the top two logits at every step, so near-ties cannot flip a token.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minformer.cache import KVCache
from minformer.generation import generate
from minformer.models.gpt import GPT, GPTConfig

# Tiny models run faster on one thread than on two busy cores (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
HYPOTHESIS = settings(deadline=None, derandomize=bool(os.environ.get("CI")), max_examples=25)
VOCAB = 29
SEQ_LEN = 40  # more than 32 decoding steps after a short prefix
MIN_MARGIN = 1e-4

SCHEMES = {
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "rope": dict(position="rope"),
    "rope-interleaved": dict(position="rope", rope_interleaved=True),
    "rope-linear": dict(position="rope", rope_scaling="linear", rope_scaling_factor=2.0),
    "rope-ntk": dict(position="rope", rope_scaling="ntk", rope_scaling_factor=4.0),
    "rope-yarn": dict(position="rope", rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=10),
    "alibi": dict(position="alibi"),
    # Few buckets, so that 40 positions reach the logarithmic and the saturated buckets.
    "t5": dict(position="t5", t5_num_buckets=8, t5_max_distance=20),
    "none": dict(position="none"),
    "rope-sliding-window": dict(position="rope", sliding_window=6),
    "alibi-sliding-window": dict(position="alibi", sliding_window=9),
}
LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}


def build_model(scheme, layout="mha", backend="sdpa", seed=0, max_seq_len=SEQ_LEN):
    """A tiny GPT whose weights are large enough (std 0.3) that logits spread over several units."""
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=VOCAB,
        max_seq_len=max_seq_len,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=LAYOUTS[layout],
        attention_backend=backend,
        init_std=0.3,
        **SCHEMES[scheme],
    )
    return GPT(config).eval()


def decode_in_chunks(model, tokens, chunk_sizes, attention_mask=None):
    """Run ``tokens`` through the model chunk by chunk with a KV cache; return the concatenated logits."""
    cache = KVCache.for_model(model, tokens.size(0))
    logits, start = [], 0
    with torch.no_grad():
        for size in chunk_sizes:
            end = start + size
            mask = attention_mask[:, :end] if attention_mask is not None else None
            position_ids = None
            if attention_mask is not None:
                position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, start:end]
            logits.append(model(tokens[:, start:end], attention_mask=mask, position_ids=position_ids, kv_cache=cache).logits)
            start = end
    assert cache.length == tokens.size(1)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_incremental_decoding_matches_full_forward(scheme, layout, backend):
    model = build_model(scheme, layout, backend)
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits

    # A 4-token prefill, then 36 single-token steps.
    actual = decode_in_chunks(model, tokens, [4] + [1] * (SEQ_LEN - 4))

    assert expected.abs().max() > 0.5  # the logits are not all near zero
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_prefill_matches_full_forward(scheme, layout):
    model = build_model(scheme, layout)
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens).logits

    actual = decode_in_chunks(model, tokens, [7, 1, 3, 9, 2, 1, 5, 12])

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@HYPOTHESIS
@given(
    scheme=st.sampled_from(sorted(SCHEMES)),
    layout=st.sampled_from(sorted(LAYOUTS)),
    backend=st.sampled_from(["naive", "sdpa", "flash"]),
    chunk_sizes=st.lists(st.integers(1, 10), min_size=1, max_size=SEQ_LEN).map(
        lambda sizes: [size for size, total in zip(sizes, torch.tensor(sizes).cumsum(0).tolist()) if total <= SEQ_LEN]
    ),
)
def test_any_chunking_matches_full_forward(scheme, layout, backend, chunk_sizes):
    chunk_sizes = chunk_sizes or [SEQ_LEN]
    model = build_model(scheme, layout, backend)
    length = sum(chunk_sizes)
    tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = model(tokens).logits

    torch.testing.assert_close(decode_in_chunks(model, tokens, chunk_sizes), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_left_padded_cached_decoding_matches_full_forward(scheme):
    model = build_model(scheme, "gqa")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 24, dtype=torch.long)
    attention_mask[1, :6] = 0  # the second row is a shorter prompt, left-padded
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(tokens, attention_mask=attention_mask, position_ids=position_ids).logits

    actual = decode_in_chunks(model, tokens, [8] + [1] * 16, attention_mask=attention_mask)

    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)


def test_cached_keys_change_later_logits():
    # Negative twin of the equalities above: the cache carries the prefix, so decoding the same
    # token after a different prefix, or with an empty cache, gives different logits.
    model = build_model("rope")
    prefix = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    other_prefix = (prefix + 1) % VOCAB
    next_token = torch.tensor([[3]])

    def logits_after(tokens):
        cache = KVCache.for_model(model, 1)
        with torch.no_grad():
            model(tokens, kv_cache=cache)
            return model(next_token, kv_cache=cache).logits

    difference = (logits_after(prefix) - logits_after(other_prefix)).abs().max()
    assert difference > 1e-3
    with torch.no_grad():
        fresh = model(next_token, kv_cache=KVCache.for_model(model, 1)).logits
    assert (logits_after(prefix) - fresh).abs().max() > 1e-3


@pytest.mark.parametrize("layout, n_kv_heads", LAYOUTS.items())
def test_cache_stores_only_key_value_heads(layout, n_kv_heads):
    model = build_model("rope", layout)
    cache = KVCache.for_model(model, batch=3)

    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.long), kv_cache=cache)

    for layer in cache.layers:
        assert layer.key_cache.shape == (3, n_kv_heads, SEQ_LEN, 8)
        assert layer.value_cache.shape == (3, n_kv_heads, SEQ_LEN, 8)
    assert len(cache.layers) == 2
    assert cache.length == 5


def test_cache_stores_rotated_keys():
    model = build_model("rope")
    attention = model.blocks[0].attn
    cache = KVCache.for_model(model, batch=1)
    tokens = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        model(tokens, kv_cache=cache)
        normed = model.blocks[0].attn_norm(model.token_embedding(tokens))
        raw_keys = attention.split_heads(attention.k_proj(normed), attention.n_kv_heads)
        rotated_keys = model.rotary(torch.arange(4)[None]).apply(raw_keys)

    torch.testing.assert_close(cache.layers[0].key_cache[:, :, :4], rotated_keys, atol=1e-6, rtol=1e-6)
    assert (cache.layers[0].key_cache[:, :, 1:4] - raw_keys[:, :, 1:4]).abs().max() > 1e-3


def test_cache_reset_forgets_positions():
    model = build_model("learned")
    tokens = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    cache = KVCache.for_model(model, batch=1)

    with torch.no_grad():
        model(tokens, kv_cache=cache)
        cache.reset()
        after_reset = model(tokens, kv_cache=cache).logits
        expected = model(tokens).logits

    torch.testing.assert_close(after_reset, expected, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_rejected():
    model = build_model("rope", max_seq_len=8)
    cache = KVCache.for_model(model, batch=1)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="max_seq_len=8"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_cache_of_other_batch_size_is_rejected():
    model = build_model("rope")
    cache = KVCache.for_model(model, batch=2)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_mask_must_cover_cached_positions():
    model = build_model("rope")
    cache = KVCache.for_model(model, batch=1)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"expected \(1, 5\)"):
            model(torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1), kv_cache=cache)


# --- Cached generation ----------------------------------------------------------------------


def greedy_margins(model, tokens, prompt_len):
    """Return the top-1 minus top-2 logit at every generated position of ``tokens`` (1, total), in
    the windows of at most max_seq_len tokens that generation feeds the model."""
    max_seq_len = model.config.max_seq_len
    margins = []
    with torch.no_grad():
        for end in range(prompt_len, tokens.size(1)):
            logits = model(tokens[:, max(0, end - max_seq_len) : end]).logits[0, -1]
            top_two = logits.topk(2).values
            margins.append(float(top_two[0] - top_two[1]))
    return margins


def left_pad(prompts, pad_token_id=0):
    """Stack prompts of different lengths into (batch, longest) tokens and mask, padded on the left."""
    longest = max(len(prompt) for prompt in prompts)
    tokens = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    return tokens, mask


PROMPTS = [[5, 17, 2], [9, 1, 22, 14, 3, 8, 11], [12, 4, 27, 6, 19]]
NEW_TOKENS = 12


# A sliding window counts padded slots too, so left padding changes what a row's window covers.
PADDING_INVARIANT_SCHEMES = [scheme for scheme in SCHEMES if "sliding-window" not in scheme]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("scheme", PADDING_INVARIANT_SCHEMES)
def test_batched_left_padded_generation_matches_each_prompt_alone(scheme, use_cache):
    model = build_model(scheme, "gqa", seed=7)
    tokens, mask = left_pad(PROMPTS)

    batched = generate(model, tokens, NEW_TOKENS, temperature=0, attention_mask=mask, use_cache=use_cache)

    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), NEW_TOKENS, temperature=0, use_cache=use_cache)
        margins = greedy_margins(model, alone, len(prompt))
        assert min(margins) > MIN_MARGIN, f"near-tie in the reference generation of prompt {row}: {min(margins)}"
        assert batched[row, -NEW_TOKENS:].tolist() == alone[0, -NEW_TOKENS:].tolist()


def test_batched_generation_without_mask_differs():
    # Negative twin: ignoring the padding (no attention_mask) changes the shorter prompts' tokens.
    model = build_model("learned", "gqa", seed=7)
    tokens, mask = left_pad(PROMPTS)

    with_mask = generate(model, tokens, NEW_TOKENS, temperature=0, attention_mask=mask)
    without_mask = generate(model, tokens, NEW_TOKENS, temperature=0)

    padded_rows = [0, 2]
    assert not torch.equal(with_mask[padded_rows], without_mask[padded_rows])


@pytest.mark.parametrize("scheme", ["learned", "rope", "alibi", "t5"])
def test_cached_generation_past_context_matches_uncached(scheme):
    model = build_model(scheme, "mqa", seed=8, max_seq_len=12)
    prompt = torch.tensor([[3, 14, 15, 9, 2, 6]])

    cached = generate(model, prompt, 20, temperature=0, use_cache=True)
    uncached = generate(model, prompt, 20, temperature=0, use_cache=False)

    assert min(greedy_margins(model, uncached, prompt.size(1))) > MIN_MARGIN
    assert cached.tolist() == uncached.tolist()
    assert cached.shape == (1, 26)


def test_generate_uses_cache_by_default(monkeypatch):
    model = build_model("rope")
    seen_lengths = []
    original_forward = model.forward

    def recording_forward(input_ids, **kwargs):
        seen_lengths.append(input_ids.size(1))
        return original_forward(input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0)
    cached_lengths = list(seen_lengths)
    seen_lengths.clear()
    generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0, use_cache=False)

    assert cached_lengths == [3, 1, 1, 1]
    assert seen_lengths == [3, 4, 5, 6]
