"""Benchmark cached against uncached greedy decoding: new tokens per second.

A GPT of the ``gpt2`` preset's shape (124M parameters, random weights) decodes greedily from a
32-token prompt. The cached path keeps every layer's keys and values (``minformer.cache``) and
feeds one token per step; the uncached path runs the whole sequence again for each new token.
Both paths must produce the same tokens, or the row reports a mismatch instead of a speed.

    python benchmarks/generation.py --out docs/benchmarks/generation.md
    python benchmarks/generation.py --quick      # a tiny model, for the test suite
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from minformer.generation import generate
from minformer.models.gpt import GPT, GPTConfig


def build_model(quick: bool) -> GPT:
    """Build the gpt2 preset's shape with random weights, or a tiny model with ``quick``."""
    torch.manual_seed(0)
    if quick:
        config = GPTConfig(vocab_size=101, max_seq_len=64, d_model=32, n_layers=2, n_heads=4)
    else:
        config = GPTConfig.from_preset("gpt2")
    return GPT(config).eval()


def time_decoding(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    """Decode greedily; return the tokens and the wall time in seconds."""
    start = time.perf_counter()
    tokens = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
    return tokens, time.perf_counter() - start


def run(quick: bool, prompt_len: int, new_tokens: int) -> str:
    model = build_model(quick)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    # Warm-up: the first call pays for allocator growth and lazy initialisation.
    generate(model, prompt, 2, temperature=0, use_cache=True)
    generate(model, prompt, 2, temperature=0, use_cache=False)

    cached_tokens, cached_seconds = time_decoding(model, prompt, new_tokens, use_cache=True)
    uncached_tokens, uncached_seconds = time_decoding(model, prompt, new_tokens, use_cache=False)

    lines = [
        f"Greedy decoding, {model.num_parameters() / 1e6:.1f}M parameters, prompt {prompt_len} tokens, "
        f"{new_tokens} new tokens, batch 1, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}",
        "",
        "| path | new tokens/s | seconds |",
        "| --- | ---: | ---: |",
    ]
    if not torch.equal(cached_tokens, uncached_tokens):
        lines.append("| mismatch: cached and uncached decoding chose different tokens | | |")
        return "\n".join(lines)
    for name, seconds in (("cached (KV cache)", cached_seconds), ("uncached", uncached_seconds)):
        lines.append(f"| {name} | {new_tokens / seconds:.1f} | {seconds:.2f} |")
    lines.append("")
    lines.append(f"cached / uncached speed: {uncached_seconds / cached_seconds:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 16 new tokens, for the test suite")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    new_tokens = 16 if args.quick else args.new_tokens
    report = run(args.quick, args.prompt_len, new_tokens)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(f"Command: `python benchmarks/generation.py{' --quick' if args.quick else ''}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
