"""The short training loop the experiments share: AdamW, warm-up and cosine schedule, random windows."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from minformer.data.datasets import RandomWindows
from minformer.models.gpt import GPT
from minformer.training.optim import build_optimizer, learning_rate


def train_gpt(model: GPT, train_tokens, context: int, batch_size: int, steps: int, lr: float, warmup_steps: int,
              seed: int, dtype: str):
    """Train ``model`` on random windows of ``train_tokens``; return (last loss, seconds, last output).

    The learning rate decays to lr / 10; a mixture-of-experts model's auxiliary loss is added to the
    cross-entropy, and the returned loss is the cross-entropy alone.
    """
    optimizer = build_optimizer(model, lr, 0.1, (0.9, 0.99))
    windows = RandomWindows(train_tokens, context, batch_size, seed)
    autocast = dtype == "bfloat16"
    model.train()
    start = time.perf_counter()
    loss_value, output = float("nan"), None

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr, lr / 10, warmup_steps, steps)
        inputs, targets = windows.next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = model(inputs)
        loss = F.cross_entropy(output.logits.float().reshape(-1, output.logits.size(-1)), targets.reshape(-1))
        total_loss = loss if output.aux_loss is None else loss + output.aux_loss
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())

    model.eval()
    return loss_value, time.perf_counter() - start, output
