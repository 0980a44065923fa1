"""Benchmark a mixture-of-experts layer against a dense feed-forward of the same active size, on CPU.

The MoE layer has ``--n-experts`` experts of inner width ``--d-ff`` and sends each token to
``--top-k`` of them with no capacity limit. The dense layer has inner width top_k * d_ff, so each
token meets the same number of expert weights in both (the MoE layer adds its small router).
Each layer runs forward and backward on the same (tokens, d_model) float32 batch, and the script
prints tokens per second for each and their ratio.

    python benchmarks/moe.py                      # d_model 512, d_ff 1024, 8 experts, top-2, 4096 tokens
    python benchmarks/moe.py --quick              # tiny sizes, for the test suite
    python benchmarks/moe.py --threads 2 --repeats 10

Times are the median of ``--repeats`` runs after one warm-up run; they are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minformer.feedforward import FeedForward  # noqa: E402  (after the path insert)
from minformer.moe import MoEFeedForward  # noqa: E402


def time_forward_backward(layer: torch.nn.Module, hidden: torch.Tensor, repeats: int) -> float:
    """Return the median seconds of one forward and backward pass, after a warm-up pass."""

    def step() -> None:
        output = layer(hidden)
        if isinstance(output, tuple):  # the MoE layer returns (output, stats)
            output = output[0]
        output.square().mean().backward()
        layer.zero_grad(set_to_none=True)

    step()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512, help="width of the hidden vectors (default 512)")
    parser.add_argument("--d-ff", type=int, default=1024, help="inner width of each expert (default 1024)")
    parser.add_argument("--n-experts", type=int, default=8, help="experts in the MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per layer (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="d_model 32, d_ff 64, 256 tokens, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.tokens, args.repeats = 32, 64, 256, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe = MoEFeedForward(args.d_model, args.d_ff, "gelu", n_experts=args.n_experts, top_k=args.top_k)
    dense = FeedForward(args.d_model, args.top_k * args.d_ff, "gelu")
    hidden = torch.randn(args.tokens, args.d_model)

    dense_seconds = time_forward_backward(dense, hidden, args.repeats)
    moe_seconds = time_forward_backward(moe, hidden, args.repeats)

    print(f"# MoE ({args.n_experts} experts, top-{args.top_k}) vs dense feed-forward of the same active size")
    print(f"d_model {args.d_model}, expert d_ff {args.d_ff}, dense d_ff {args.top_k * args.d_ff}, "
          f"{args.tokens} tokens, float32, {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}")
    print()
    print("| layer | parameters | tokens/s (forward + backward) |")
    print("| --- | --- | --- |")
    for name, layer, seconds in (("dense", dense, dense_seconds), ("moe", moe, moe_seconds)):
        n_parameters = sum(parameter.numel() for parameter in layer.parameters())
        print(f"| {name} | {n_parameters:,} | {args.tokens / seconds:,.0f} |")
    print()
    print(f"moe / dense throughput ratio: {dense_seconds / moe_seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
