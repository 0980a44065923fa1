"""The comparison workloads: minformer and Hugging Face ``transformers`` on the same weights and inputs.

Each workload builds a minformer model from a seeded initialisation, writes it with ``to_hf`` and
loads that checkpoint into the ``transformers`` class, so both sides hold the same weights. Before
timing anything, it checks that both sides compute the same thing: the same loss at step 0 for
training, the same outputs for an encoder, the same greedy tokens for generation. A failed check
turns the row into ``FAILED`` and no speed is printed for it.

Training steps are forward, backward and an AdamW step (minformer's ``build_optimizer`` on both
sides, so the optimizer does the same work). It is the fused AdamW kernel, which is also what the
``transformers`` Trainer uses by default with torch 2.8 or later (``optim="adamw_torch_fused"``). bf16 training uses ``torch.autocast``; bf16
inference converts the weights to bf16. Times are medians over repeats after warm-up.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

from compare_measure import BANDWIDTH, GEMM_BF16, GEMM_FP32, Row, median_seconds, median_seconds_interleaved
from minformer.generation import generate
from minformer.interop import to_hf
from minformer.models.bert import BERT, BERTConfig
from minformer.models.gpt import GPT, GPTConfig
from minformer.models.t5 import T5, T5Config
from minformer.scaling.accounting import TRAINING_PASSES, count_parameters, flops_per_token
from minformer.training.optim import build_optimizer

LOSS_TOLERANCE = 1e-4
"""Largest |minformer loss - transformers loss| at step 0, relative to the loss, for fp32."""
BF16_LOSS_TOLERANCE = 2e-2
"""The same for bf16 autocast, whose matrix products round to 8 bits of mantissa."""
HIDDEN_TOLERANCE = 1e-4
"""Largest absolute difference of encoder outputs at real (non-padding) positions, fp32."""

TARGETS = {
    "gpt_train": 1.1,
    "generation": 1.3,
    "bert": 1.05,
    "t5_train": 1.2,
    "bf16_vs_fp32": 1.8,
    "bf16_vs_bf16": 1.1,
}
"""Ratios (minformer / transformers) each row aims for, on a 2-core CPU."""


@dataclass(frozen=True)
class Settings:
    """Sizes, repeat counts and optional variants that the workloads run with."""

    quick: bool
    """Tiny shapes for the test suite, whose figures mean nothing."""
    warmup: int
    repeats: int
    generation_repeats: int
    """Timed runs of a whole generation, each of which is a hundred forward passes."""
    compile: bool
    """Whether to also measure the torch.compile rows."""
    bf16: bool
    """Whether to also measure the bf16 rows. False on a CPU without bf16 instructions."""
    bf16_reason: str
    workdir: Path
    """Folder for the Hugging Face checkpoints written by ``to_hf``."""


def hf_copy(model: torch.nn.Module, hf_class, workdir: Path, name: str) -> torch.nn.Module:
    """Write ``model`` with ``to_hf`` and load it into the ``transformers`` class ``hf_class``."""
    directory = workdir / name
    to_hf(model, directory)
    peer = hf_class.from_pretrained(directory)
    return peer.float()


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def failed_row(row: Row, reason: str) -> Row:
    row.status = f"FAILED: {reason}"
    return row


def compile_failure(error: Exception) -> str:
    """Return the one-line reason torch.compile failed, for a skipped row."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"skipped: torch.compile failed on this machine ({type(error).__name__}: {message[:160]})"


# ---- training --------------------------------------------------------------------------------------


@dataclass
class TrainingPair:
    """A training workload: both models, one batch and how each side computes its loss."""

    name: str
    ours: torch.nn.Module
    peer: torch.nn.Module
    batch: dict
    ours_loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    peer_loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    tokens_per_step: int
    flops_per_token: float


OPTIMIZER_SETTINGS = {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.99)}
"""AdamW settings of every timed training step, on both sides."""


def training_step(
    model: torch.nn.Module, loss_fn, batch: dict, autocast: torch.dtype | None, compile: bool
) -> tuple[Callable[[], None], list[float]]:
    """Return one training step on a fresh copy of ``model`` and the list each step appends its loss to."""
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(model, **OPTIMIZER_SETTINGS)
    forward_model = torch.compile(model) if compile else model
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_fn(forward_model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    return step, losses


def time_training(
    pair: "TrainingPair", settings: Settings, autocast: torch.dtype | None, compile: bool
) -> tuple[float, float, list[float], list[float]]:
    """Train fresh copies of both sides in alternation; return both median step seconds and both loss lists."""
    ours_step, ours_losses = training_step(pair.ours, pair.ours_loss, pair.batch, autocast, compile)
    peer_step, peer_losses = training_step(pair.peer, pair.peer_loss, pair.batch, autocast, compile)
    ours_seconds, peer_seconds = median_seconds_interleaved([ours_step, peer_step], settings.warmup, settings.repeats)
    return ours_seconds, peer_seconds, ours_losses, peer_losses


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
"""The matrix-product kernels a training step calls; none of them calls another."""


def recorded_matrix_products(step: Callable[[], None]) -> list[tuple[str, list[list[int]]]]:
    """Run ``step`` once under the profiler; return the name and input shapes of each matrix product it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        step()
    # Scalar arguments (addmm's beta and alpha) are recorded with the empty shape; only the matrices matter.
    return [
        (event.name, [shape for shape in event.input_shapes if shape])
        for event in profiler.events()
        if event.name in MATRIX_PRODUCTS
    ]


def replay_seconds(products: list[tuple[str, list[list[int]]]], settings: Settings) -> float:
    """Return the median seconds of running ``products`` again, one after another, on random contiguous operands."""
    generator = torch.Generator().manual_seed(0)
    calls = []
    for name, shapes in products:
        function = getattr(torch, name.removeprefix("aten::"))
        operands = [torch.randn(shape, generator=generator) for shape in shapes]
        calls.append((function, operands))

    def replay() -> None:
        for function, operands in calls:
            function(*operands)

    return median_seconds(replay, settings.warmup, settings.repeats)


def add_matrix_product_bound(row: Row, pair: TrainingPair, settings: Settings) -> None:
    """Set ``row.bound``: the share of the peer's training step that its matrix products and AdamW take.

    The products are recorded from one peer step (names and shapes) and replayed without anything
    else; the optimizer update is timed alone. minformer runs the same products (same layers, same
    shapes) and the same fused AdamW, so whatever lead it can have comes from the rest of the step:
    the bound gives how little of that rest a target allows.
    """
    if row.status != "ok" or not row.peer or row.target is None:
        return
    peer_step, _ = training_step(pair.peer, pair.peer_loss, pair.batch, None, False)
    peer_step()  # the first step builds the optimizer state, which later steps do not
    products = recorded_matrix_products(peer_step)
    product_seconds = replay_seconds(products, settings)
    fixed = product_seconds + optimizer_seconds(pair, settings)
    peer_seconds = pair.tokens_per_step / row.peer
    ours_seconds = pair.tokens_per_step / row.ours
    allowed = peer_seconds / row.target - fixed
    row.bound = (
        f"the peer's {len(products)} matrix products per step, replayed alone, take {product_seconds:.3g} s, and its "
        f"AdamW update {fixed - product_seconds:.3g} s, of its {peer_seconds:.3g} s step ({fixed / peer_seconds:.0%}). "
        f"minformer runs the same products and update. So {row.target:.2f}x leaves {max(allowed, 0.0):.3g} s for the "
        f"rest of its step, against {peer_seconds - fixed:.3g} s for the peer and {ours_seconds - fixed:.3g} s for "
        "minformer now."
    )


def optimizer_seconds(pair: TrainingPair, settings: Settings) -> float:
    """Return the median seconds of the peer's AdamW update alone, with the gradients of one step in place."""
    model = copy.deepcopy(pair.peer).train()
    optimizer = build_optimizer(model, **OPTIMIZER_SETTINGS)
    pair.peer_loss(model, pair.batch).backward()
    return median_seconds(optimizer.step, settings.warmup, settings.repeats)


def step_zero_losses(pair: TrainingPair, autocast: torch.dtype | None) -> tuple[float, float]:
    """Return (minformer, transformers) losses of the first batch, before any update."""
    losses = []
    for model, loss_fn in ((pair.ours, pair.ours_loss), (pair.peer, pair.peer_loss)):
        model.train()
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            losses.append(float(loss_fn(model, pair.batch)))
    return losses[0], losses[1]


def training_rows(pair: TrainingPair, settings: Settings, target: float, variants: bool = True) -> list[Row]:
    """Return the fp32 row and, with ``variants``, the bf16 rows and the compiled row of one training workload."""
    row = Row(pair.name + ", fp32", "tokens/s", target=target, work_per_unit=pair.flops_per_token, roofline=GEMM_FP32)
    ours_loss, peer_loss = step_zero_losses(pair, None)
    difference = relative_difference(ours_loss, peer_loss)
    row.check = f"step-0 loss {ours_loss:.4f} vs {peer_loss:.4f}"
    if difference > LOSS_TOLERANCE:
        return [failed_row(row, f"step-0 losses differ by {difference:.1e} (relative), above {LOSS_TOLERANCE:.0e}")]

    ours_seconds, peer_seconds, ours_fp32_losses, peer_fp32_losses = time_training(pair, settings, None, False)
    row.ours = pair.tokens_per_step / ours_seconds
    row.peer = pair.tokens_per_step / peer_seconds
    rows = [row]
    if not variants:
        return rows
    rows += bf16_training_rows(pair, settings, row.peer, ours_fp32_losses, peer_fp32_losses)
    if settings.compile:
        rows.append(compiled_training_row(pair, settings))
    return rows


def bf16_training_rows(
    pair: TrainingPair, settings: Settings, peer_fp32_rate: float, ours_fp32_losses: list, peer_fp32_losses: list
) -> list[Row]:
    """Return minformer's bf16-autocast rate against transformers' fp32 and bf16-autocast rates."""
    against_fp32 = Row(
        pair.name + ", bf16 autocast", "tokens/s", peer_name="transformers fp32", target=TARGETS["bf16_vs_fp32"],
        work_per_unit=pair.flops_per_token, roofline=GEMM_BF16, peer_roofline=GEMM_FP32,
    )
    against_bf16 = Row(
        pair.name + ", bf16 autocast", "tokens/s", peer_name="transformers bf16", target=TARGETS["bf16_vs_bf16"],
        work_per_unit=pair.flops_per_token, roofline=GEMM_BF16,
    )
    if not settings.bf16:
        for row in (against_fp32, against_bf16):
            row.status = f"n/a: {settings.bf16_reason}"
        return [against_fp32, against_bf16]

    ours_loss, peer_loss = step_zero_losses(pair, torch.bfloat16)
    difference = relative_difference(ours_loss, peer_loss)
    if difference > BF16_LOSS_TOLERANCE:
        reason = f"bf16 step-0 losses {ours_loss:.4f} and {peer_loss:.4f} differ by more than {BF16_LOSS_TOLERANCE:.0e}"
        return [failed_row(against_fp32, reason), failed_row(against_bf16, reason)]

    ours_seconds, peer_seconds, ours_losses, peer_losses = time_training(pair, settings, torch.bfloat16, False)
    ours_drift = abs(ours_losses[-1] - ours_fp32_losses[-1])
    peer_drift = abs(peer_losses[-1] - peer_fp32_losses[-1])
    check = f"loss after {len(ours_losses)} steps: bf16 - fp32 = {ours_drift:.1e} (transformers {peer_drift:.1e})"
    against_fp32.ours = against_bf16.ours = pair.tokens_per_step / ours_seconds
    against_fp32.peer = peer_fp32_rate
    against_bf16.peer = pair.tokens_per_step / peer_seconds
    against_fp32.check = against_bf16.check = check
    return [against_fp32, against_bf16]


def compiled_training_row(pair: TrainingPair, settings: Settings) -> Row:
    """Return minformer under torch.compile against transformers under torch.compile, both fp32.

    The row has no target: it shows what compiling changes, next to the eager fp32 row.
    """
    row = Row(
        pair.name + ", fp32, torch.compile", "tokens/s", peer_name="transformers compiled",
        work_per_unit=pair.flops_per_token, roofline=GEMM_FP32,
    )
    try:
        ours_seconds, peer_seconds, ours_losses, peer_losses = time_training(pair, settings, None, True)
    except Exception as error:  # noqa: BLE001  (any compiler failure skips the row, with its reason)
        row.status = compile_failure(error)
        return row
    difference = relative_difference(ours_losses[0], peer_losses[0])
    row.check = f"compiled step-0 loss {ours_losses[0]:.4f} vs {peer_losses[0]:.4f}"
    if difference > LOSS_TOLERANCE:
        return failed_row(row, f"compiled step-0 losses differ by {difference:.1e} (relative)")
    row.ours = pair.tokens_per_step / ours_seconds
    row.peer = pair.tokens_per_step / peer_seconds
    return row


def gpt_training_pair(settings: Settings) -> TrainingPair:
    """Build the pair of the character-level Shakespeare GPT shape: 6 layers, 6 heads, width 384, context 256, batch 8."""
    if settings.quick:
        config = GPTConfig(vocab_size=65, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
        batch_size = 2
    else:
        config = GPTConfig(vocab_size=65, max_seq_len=256, d_model=384, n_layers=6, n_heads=6, dropout=0.0)
        batch_size = 8
    return gpt_pair_for_config(config, batch_size, settings, "GPT training")


def gpt_pair_for_config(config: GPTConfig, batch_size: int, settings: Settings, name: str) -> TrainingPair:
    """Build both GPTs of ``config`` with the same weights and a batch of full-context random tokens."""
    torch.manual_seed(0)
    ours = GPT(config)
    peer = hf_copy(ours, transformers.GPT2LMHeadModel, settings.workdir, f"gpt-{config.d_model}")
    context = config.max_seq_len
    input_ids = torch.randint(0, config.vocab_size, (batch_size, context), generator=torch.Generator().manual_seed(1))
    # transformers shifts labels inside the model; minformer takes next-token targets, the last one ignored.
    targets = torch.cat([input_ids[:, 1:], torch.full((batch_size, 1), -100)], dim=1)
    return TrainingPair(
        name=name,
        ours=ours,
        peer=peer,
        batch={"input_ids": input_ids, "targets": targets},
        ours_loss=lambda model, batch: model(batch["input_ids"], targets=batch["targets"]).loss,
        peer_loss=lambda model, batch: model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
        tokens_per_step=batch_size * context,
        flops_per_token=flops_per_token(config, context),
    )


def t5_training_pair(settings: Settings) -> TrainingPair:
    """Build the T5-small pair (v1.0, 60M parameters): batch 8, source 128 tokens, target 32 tokens."""
    if settings.quick:
        config = T5Config(
            vocab_size=101, max_seq_len=64, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=2,
            d_head=16, d_ff=64, dropout=0.0,
        )
        batch_size, source_len, target_len = 2, 16, 8
    else:
        config = T5Config.from_preset("t5-small", dropout=0.0)
        batch_size, source_len, target_len = 8, 128, 32
    torch.manual_seed(0)
    ours = T5(config)
    peer = hf_copy(ours, transformers.T5ForConditionalGeneration, settings.workdir, "t5")

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, config.vocab_size, (batch_size, source_len), generator=generator)
    labels = torch.randint(2, config.vocab_size, (batch_size, target_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    tokens = batch_size * (source_len + target_len)
    return TrainingPair(
        name="T5 training",
        ours=ours,
        peer=peer,
        batch=batch,
        ours_loss=loss,
        peer_loss=loss,
        tokens_per_step=tokens,
        flops_per_token=t5_training_flops(ours, batch_size, source_len, target_len) / tokens,
    )


def t5_training_flops(model: T5, batch_size: int, source_len: int, target_len: int) -> float:
    """Return the training FLOPs of one T5 step by the Kaplan count, applied to each stack.

    A source token passes the encoder only, a target token the decoder only, so each stack's
    6N term uses its own non-embedding parameters (the decoder's include cross-attention) and
    its own tokens. The attention term 6 n_layers n_ctx d_attn uses the encoder's context
    for encoder tokens, and target plus source lengths (self plus cross) for decoder tokens.
    """
    config = model.config
    d_attn = config.n_heads * config.d_head
    encoder_params = count_parameters(model.encoder, non_embedding=True)
    decoder_params = count_parameters(model.decoder, non_embedding=True)
    encoder = 2 * encoder_params + 2 * config.n_encoder_layers * source_len * d_attn
    decoder = 2 * decoder_params + 2 * config.n_decoder_layers * (target_len + source_len) * d_attn
    return TRAINING_PASSES * batch_size * (source_len * encoder + target_len * decoder)


# ---- BERT inference --------------------------------------------------------------------------------


def bert_rows(settings: Settings) -> list[Row]:
    """Time the BERT-base forward pass on 8 x 128 tokens with a padding mask, under torch.inference_mode."""
    if settings.quick:
        config = BERTConfig(vocab_size=101, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
        batch_size, seq_len = 2, 16
    else:
        config = BERTConfig.from_preset("bert-base", dropout=0.0)
        batch_size, seq_len = 8, 128
    torch.manual_seed(0)
    ours = BERT(config).eval()
    peer = hf_copy(ours, transformers.BertModel, settings.workdir, "bert").eval()

    input_ids = torch.randint(1, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    # Rows of decreasing length down to 3/4 of the sequence, so that about 1 position in 8 is padding.
    lengths = [seq_len - (index * seq_len) // (4 * batch_size) for index in range(batch_size)]
    attention_mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)

    forward_flops = flops_per_token(config, seq_len) / TRAINING_PASSES
    row = Row("BERT inference, fp32", "tokens/s", target=TARGETS["bert"], work_per_unit=forward_flops, roofline=GEMM_FP32)
    with torch.inference_mode():
        ours_hidden = ours(input_ids, attention_mask=attention_mask).hidden_states
        peer_hidden = peer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    difference = float((ours_hidden[real] - peer_hidden[real]).abs().max())
    row.check = f"max |hidden difference| {difference:.1e} at real positions"
    if difference > HIDDEN_TOLERANCE:
        return [failed_row(row, f"encoder outputs differ by {difference:.1e}, above {HIDDEN_TOLERANCE:.0e}")]

    def run_ours():
        with torch.inference_mode():
            ours(input_ids, attention_mask=attention_mask)

    def run_peer():
        with torch.inference_mode():
            peer(input_ids=input_ids, attention_mask=attention_mask)

    tokens = batch_size * seq_len
    ours_seconds, peer_seconds = median_seconds_interleaved([run_ours, run_peer], settings.warmup, settings.repeats)
    row.ours = tokens / ours_seconds
    row.peer = tokens / peer_seconds
    return [row]


# ---- generation ------------------------------------------------------------------------------------


def decode_bytes_per_token(model: GPT, mean_context: int, element_size: int) -> float:
    """Estimate the bytes one decoding step reads: every weight but the position table, and the KV cache.

    The token and position tables are read one row per token, but a tied output layer reads the
    whole token table, so it counts in full.
    """
    config = model.config
    weights = model.num_parameters() - config.max_seq_len * config.d_model
    kv_cache = 2 * config.n_layers * mean_context * config.n_kv_heads * config.d_head
    return float((weights + kv_cache) * element_size)


def weights_alone_seconds(model: GPT, settings: Settings) -> float:
    """Return the median seconds of one decoded token's matrix-vector products and nothing else.

    Every linear layer of ``model`` multiplies one random vector, in the order a decoded token
    meets them, with the kernels ``minformer.linear.Linear`` calls (``torch.addmv``, ``torch.mv``).
    Attention over the cache, norms, the embedding lookup and all dispatch are left out, so no
    decoder that uses these kernels produces a token faster than this.
    """
    generator = torch.Generator().manual_seed(0)
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    vectors = [torch.randn(layer.in_features, generator=generator).to(layer.weight.dtype) for layer in layers]

    def products() -> None:
        for layer, vector in zip(layers, vectors):
            if layer.bias is None:
                torch.mv(layer.weight, vector)
            else:
                torch.addmv(layer.bias, layer.weight, vector)

    with torch.inference_mode():
        return median_seconds(products, settings.warmup, 5 * settings.generation_repeats)


def set_weights_alone_bound(row: Row, seconds: float) -> None:
    """Set ``row.bound`` from the time of the weight matrices' products alone (``weights_alone_seconds``)."""
    best_rate = 1.0 / seconds
    row.bound = (
        f"the matrix-vector products alone (each weight matrix times one vector) take {1000 * seconds:.3g} ms per "
        f"token. No decoder on these kernels exceeds {best_rate:,.1f} new tokens/s, {best_rate / row.peer:.2f}x the "
        f"peer. minformer spends {1000 / row.ours - 1000 * seconds:.3g} ms per token on the rest (prefill, "
        "attention, norms, dispatch)."
    )


def greedy_ours(model: GPT, prompt: torch.Tensor, new_tokens: int, compile: bool = False) -> torch.Tensor:
    return generate(model, prompt, new_tokens, temperature=0, use_cache=True, compile=compile)


def greedy_peer(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Decode greedily as transformers users do: ``generate`` with the cache, under inference mode."""
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            use_cache=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )


def generation_rows(settings: Settings) -> list[Row]:
    """Time greedy decoding with the gpt2 shape (124M, random weights): batch 1, 32-token prompt, 128 new tokens."""
    if settings.quick:
        config = GPTConfig(vocab_size=101, max_seq_len=64, d_model=32, n_layers=2, n_heads=2)
        prompt_len, new_tokens = 8, 8
    else:
        config = GPTConfig.from_preset("gpt2")
        prompt_len, new_tokens = 32, 128
    torch.manual_seed(0)
    ours = GPT(config).eval()
    peer = hf_copy(ours, transformers.GPT2LMHeadModel, settings.workdir, "gpt2").eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    mean_context = prompt_len + new_tokens // 2

    row = Row(
        "GPT-2 greedy generation, fp32", "new tokens/s", target=TARGETS["generation"],
        work_per_unit=decode_bytes_per_token(ours, mean_context, 4), roofline=BANDWIDTH,
    )
    ours_tokens = greedy_ours(ours, prompt, new_tokens)
    peer_tokens = greedy_peer(peer, prompt, new_tokens)
    agree = int((ours_tokens[0, prompt_len:] == peer_tokens[0, prompt_len:]).sum())
    row.check = f"greedy tokens equal: {agree}/{new_tokens}"
    if agree != new_tokens or ours_tokens.shape != peer_tokens.shape:
        return [failed_row(row, f"only {agree} of {new_tokens} greedy tokens agree")]

    ours_seconds, peer_seconds = median_seconds_interleaved(
        [lambda: greedy_ours(ours, prompt, new_tokens), lambda: greedy_peer(peer, prompt, new_tokens)],
        settings.warmup,
        settings.generation_repeats,
    )
    row.ours = new_tokens / ours_seconds
    row.peer = new_tokens / peer_seconds
    set_weights_alone_bound(row, weights_alone_seconds(ours, settings))
    rows = [row]
    rows += bf16_generation_rows(ours, peer, prompt, new_tokens, ours_tokens, row.peer, mean_context, settings)
    if settings.compile:
        rows.append(compiled_generation_row(ours, peer, prompt, new_tokens, ours_tokens, mean_context, settings))
    return rows


def bf16_generation_rows(ours, peer, prompt, new_tokens, fp32_tokens, peer_fp32_rate, mean_context, settings) -> list[Row]:
    """Return minformer with bf16 weights against transformers fp32 and transformers with bf16 weights."""
    prompt_len = prompt.size(1)
    rows = [
        Row("GPT-2 greedy generation, bf16 weights", "new tokens/s", peer_name=peer_name, target=TARGETS[target])
        for peer_name, target in (("transformers fp32", "bf16_vs_fp32"), ("transformers bf16", "bf16_vs_bf16"))
    ]
    if not settings.bf16:
        for row in rows:
            row.status = f"n/a: {settings.bf16_reason}"
        return rows

    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    peer_bf16 = copy.deepcopy(peer).to(torch.bfloat16)
    ours_tokens = greedy_ours(ours_bf16, prompt, new_tokens)
    peer_tokens = greedy_peer(peer_bf16, prompt, new_tokens)
    ours_share = float((ours_tokens[0, prompt_len:] == fp32_tokens[0, prompt_len:]).float().mean())
    peer_share = float((peer_tokens[0, prompt_len:] == fp32_tokens[0, prompt_len:]).float().mean())
    ours_seconds, peer_seconds = median_seconds_interleaved(
        [lambda: greedy_ours(ours_bf16, prompt, new_tokens), lambda: greedy_peer(peer_bf16, prompt, new_tokens)],
        settings.warmup,
        settings.generation_repeats,
    )
    for row in rows:
        row.ours = new_tokens / ours_seconds
        row.work_per_unit = decode_bytes_per_token(ours, mean_context, 2)
        row.roofline = BANDWIDTH
        row.check = f"greedy tokens equal to fp32: {100 * ours_share:.0f}% (transformers {100 * peer_share:.0f}%)"
    rows[0].peer = peer_fp32_rate
    rows[0].peer_work_per_unit = decode_bytes_per_token(ours, mean_context, 4)  # the peer reads fp32 weights
    rows[1].peer = new_tokens / peer_seconds
    bf16_seconds = weights_alone_seconds(ours_bf16, settings)
    for row in rows:
        set_weights_alone_bound(row, bf16_seconds)
    return rows


def compiled_generation_row(ours, peer, prompt, new_tokens, fp32_tokens, mean_context, settings) -> Row:
    """Return minformer's ``generate(..., compile=True)`` against transformers' default (eager) ``generate``.

    The row has no target: it shows what compiling changes, next to the eager fp32 row.
    """
    row = Row(
        "GPT-2 greedy generation, fp32, torch.compile", "new tokens/s", peer_name="transformers eager",
        work_per_unit=decode_bytes_per_token(ours, mean_context, 4), roofline=BANDWIDTH,
    )
    try:
        tokens = greedy_ours(ours, prompt, new_tokens, compile=True)
    except Exception as error:  # noqa: BLE001  (any compiler failure skips the row, with its reason)
        row.status = compile_failure(error)
        return row
    if not torch.equal(tokens, fp32_tokens):
        row.check = "greedy tokens differ from eager"
        return failed_row(row, "compiled decoding chose other tokens than eager decoding")
    row.check = "greedy tokens equal to eager"
    ours_seconds, peer_seconds = median_seconds_interleaved(
        [lambda: greedy_ours(ours, prompt, new_tokens, compile=True), lambda: greedy_peer(peer, prompt, new_tokens)],
        settings.warmup,
        settings.generation_repeats,
    )
    row.ours = new_tokens / ours_seconds
    row.peer = new_tokens / peer_seconds
    return row


def make_settings(quick: bool, compile: bool, bf16: bool, bf16_reason: str, repeats: int | None = None) -> Settings:
    """Build ``Settings`` with a fresh temporary folder for the checkpoints."""
    workdir = Path(tempfile.mkdtemp(prefix="minformer-compare-"))
    return Settings(
        quick=quick,
        warmup=1 if quick else 2,
        repeats=repeats or (1 if quick else 5),
        generation_repeats=repeats or (1 if quick else 3),
        compile=compile,
        bf16=bf16,
        bf16_reason=bf16_reason,
        workdir=workdir,
    )
