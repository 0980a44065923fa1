"""Train minformer's T5, transformers' T5 and minformer's 2017 Transformer to copy random strings.

The probe behind the T5 result in docs/encoder-decoder.md: it checks whether T5's slow start on
the Folio pairs is a fault of minformer's T5 or a property of T5 at this size. All three models
have width 128, 2 + 2 layers, 4 heads and d_ff 512, and no dropout. They train with AdamW
(learning rate 1e-3 after 50 warm-up steps, gradient clipping at 1.0) on the same batches: 32
strings of 20 to 39 random letters (28 symbols). The training loss is printed every 50 steps. A
model that ignores its source scores ln 28 = 3.33 nats per character.

    python docs/encoder-decoder/copy_probe.py minformer-t5 1500
    python docs/encoder-decoder/copy_probe.py transformers-t5 1500   # needs transformers (dev extra)
    python docs/encoder-decoder/copy_probe.py minformer-transformer 400
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from minformer.models.t5 import T5, T5Config
from minformer.models.transformer import Transformer, TransformerConfig

VOCAB, PAD, EOS = 30, 0, 1
D_MODEL, HEADS, D_FF, LR, WARMUP, BATCH = 128, 4, 512, 1e-3, 50, 32


def copy_batch(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Return input ids, source mask, decoder input ids and targets of one batch of copy pairs."""
    lengths = torch.randint(20, 40, (BATCH,), generator=generator)
    rows = [torch.randint(2, VOCAB, (int(length),), generator=generator).tolist() + [EOS] for length in lengths]
    width = max(len(row) for row in rows)
    input_ids = torch.full((BATCH, width), PAD)
    mask = torch.zeros((BATCH, width), dtype=torch.long)
    targets = torch.full((BATCH, width), -100)
    decoder_ids = torch.full((BATCH, width), PAD)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
        targets[index, : len(row)] = torch.tensor(row)
        decoder_ids[index, 1 : len(row)] = torch.tensor(row[:-1])
    return input_ids, mask, decoder_ids, targets


def build(name: str):
    """Return the model and a function from (input ids, mask, decoder ids) to logits."""
    if name == "minformer-t5":
        model = T5(T5Config(vocab_size=VOCAB, d_model=D_MODEL, n_encoder_layers=2, n_decoder_layers=2, n_heads=HEADS,
                            d_head=D_MODEL // HEADS, d_ff=D_FF, dropout=0.0))
        return model, lambda ids, mask, dec: model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    if name == "transformers-t5":
        import transformers

        config = transformers.T5Config(vocab_size=VOCAB, d_model=D_MODEL, num_layers=2, num_decoder_layers=2,
                                       num_heads=HEADS, d_kv=D_MODEL // HEADS, d_ff=D_FF, dropout_rate=0.0,
                                       pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
        model = transformers.T5ForConditionalGeneration(config)
        return model, lambda ids, mask, dec: model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    if name == "minformer-transformer":
        model = Transformer(TransformerConfig(vocab_size=VOCAB, d_model=D_MODEL, n_encoder_layers=2, n_decoder_layers=2,
                                              n_heads=HEADS, d_ff=D_FF, dropout=0.0, max_seq_len=64))
        return model, lambda ids, mask, dec: model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    raise SystemExit(f"Unknown model {name!r}; expected minformer-t5, transformers-t5 or minformer-transformer.")


def main() -> None:
    name, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, logits_of = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        input_ids, mask, decoder_ids, targets = copy_batch(generator)
        logits = logits_of(input_ids, mask, decoder_ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
