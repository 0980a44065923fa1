"""Emergence under the microscope: GPTs of several sizes learn multi-digit addition.

Every model trains with the same recipe (data, seed, optimizer, batch size and number of steps, so
the same number of training examples) on sums written ``aaaa+bbbb=sssss$``. The operands are
zero-padded to ``digits`` digits, the sum is zero-padded to ``digits + 1`` digits, and ``$`` ends
it. Fixed widths give every example the same length, so batches need no padding. The loss covers
the answer digits and the end token only, and the test pairs (a, b) never occur in training.

The sum is written most significant digit first by default. Its first digits then depend on the
carries out of every lower column, which the model must work out before writing them. Written
least significant digit first (``reverse_answer=True``), each digit needs only two operand digits
and the carry out of the digit just written. In trials with 4-digit operands and this recipe, a
14k-parameter model already reached 0.99 exact match on reversed sums, so the jump fell below the
second-smallest size.

Three metrics are measured on the test set for each size:

- exact match: the share of sums whose ``digits + 1`` greedy-decoded answer digits are all right;
- per-digit accuracy: the share of answer digit positions that are right, both under greedy
  decoding (an early mistake can spoil later digits) and teacher forced (argmax at each position
  given the true earlier digits);
- log-likelihood of the true answer, teacher forced: mean nats per answer digit and per answer.

Schaeffer et al. 2023 ("Are Emergent Abilities of Large Language Models a Mirage?") argue that an
all-or-nothing metric such as exact match turns a smooth gain in per-token accuracy p into a sharp
one, because a whole answer of L tokens is right with probability about p^L.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minformer.generation import generate
from minformer.models.gpt import GPT, GPTConfig
from minformer.scaling.accounting import count_parameters
from minformer.training.optim import build_optimizer, learning_rate

logger = logging.getLogger(__name__)

VOCABULARY = "0123456789+=$_"
"""Token id i is character i: the digits, '+', '=', the end token '$' and the pad token '_'."""
END, PAD = "$", "_"
# Every example has the same length (fixed-width operands and sum), so no batch contains the pad token.
TOKEN_IDS = {character: index for index, character in enumerate(VOCABULARY)}


@dataclass(frozen=True)
class ModelSize:
    """Shape of one GPT in the sweep; the feed-forward width is 4 * d_model."""

    d_model: int
    n_layers: int
    n_heads: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}-L{self.n_layers}"


@dataclass(frozen=True)
class EmergenceSettings:
    """Sizes of one emergence run."""

    digits: int = 4
    """Operand width K: a and b are drawn from 0 .. 10^K - 1."""
    reverse_answer: bool = False
    """Whether the sum is written least significant digit first (the default writes it most significant first)."""
    sizes: tuple[ModelSize, ...] = (
        ModelSize(16, 1, 2), ModelSize(32, 1, 2), ModelSize(32, 2, 2), ModelSize(40, 2, 4), ModelSize(44, 2, 4),
        ModelSize(48, 2, 4), ModelSize(52, 2, 4), ModelSize(56, 2, 4), ModelSize(64, 2, 4), ModelSize(96, 3, 4),
        ModelSize(128, 4, 4), ModelSize(192, 4, 6),
    )
    """Model shapes, smallest first. In trials, the 2-layer models of d_model 40 to 56 straddled the jump
    in exact match, so the ladder is densest there."""
    n_train: int = 200_000
    """Distinct (a, b) pairs the training batches are drawn from."""
    n_test: int = 2000
    """Distinct (a, b) pairs held out for the metrics."""
    batch_size: int = 128
    steps: int = 1500
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 1337
    eval_batch_size: int = 500

    def __post_init__(self):
        for name in ("digits", "n_train", "n_test", "batch_size", "steps", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; expected a positive integer.")
        n_pairs = 10 ** (2 * self.digits)
        if self.n_train + self.n_test > n_pairs:
            raise ValueError(
                f"n_train + n_test = {self.n_train + self.n_test} exceeds the {n_pairs} distinct pairs of "
                f"{self.digits}-digit operands; lower them or raise digits."
            )
        if not isinstance(self.reverse_answer, bool):
            raise ValueError(f"reverse_answer={self.reverse_answer!r} is invalid; expected True or False.")
        if not self.sizes:
            raise ValueError("sizes is empty; give at least one ModelSize.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is invalid; it must be in [0, steps={self.steps}).")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} is invalid; expected a positive finite number.")

    @property
    def answer_digits(self) -> int:
        """Number of digits of every written sum: one more than the operands, for the carry."""
        return self.digits + 1

    @property
    def prompt_length(self) -> int:
        """Length of ``aaaa+bbbb=``."""
        return 2 * self.digits + 2

    @property
    def sequence_length(self) -> int:
        """Length of a whole example, end token included."""
        return self.prompt_length + self.answer_digits + 1


FULL = EmergenceSettings()
QUICK = EmergenceSettings(
    digits=2, sizes=(ModelSize(16, 1, 2), ModelSize(32, 1, 2)), n_train=500, n_test=100, batch_size=16, steps=20,
    warmup_steps=2, eval_batch_size=100,
)


def format_example(a: int, b: int, digits: int, reverse_answer: bool = False) -> str:
    """Write the sum of ``a`` and ``b`` as ``aaaa+bbbb=sssss$``, the sum's digits reversed if ``reverse_answer``."""
    if not (0 <= a < 10**digits and 0 <= b < 10**digits):
        raise ValueError(f"operands a={a}, b={b} must be in [0, {10**digits}) for digits={digits}.")
    answer = str(a + b).zfill(digits + 1)
    if reverse_answer:
        answer = answer[::-1]
    return f"{a:0{digits}d}+{b:0{digits}d}={answer}{END}"


def parse_example(text: str, reverse_answer: bool = False) -> tuple[int, int, int]:
    """Read ``(a, b, sum)`` back from a ``format_example`` string written with the same ``reverse_answer``."""
    if not text.endswith(END) or text.count("+") != 1 or text.count("=") != 1:
        raise ValueError(f"{text!r} is not of the form aaaa+bbbb=ssss{END}.")
    operands, answer = text[:-1].split("=")
    a, b = operands.split("+")
    return int(a), int(b), int(answer[::-1] if reverse_answer else answer)


def encode(text: str) -> list[int]:
    """Map each character of ``text`` to its token id."""
    try:
        return [TOKEN_IDS[character] for character in text]
    except KeyError as error:
        raise ValueError(f"character {error.args[0]!r} is not in the vocabulary {VOCABULARY!r}.") from None


def split_pairs(settings: EmergenceSettings) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Draw disjoint training and test pairs (a, b) without replacement, with a seeded RNG."""
    operand_range = 10**settings.digits
    rng = random.Random(settings.seed)
    # Sampling indices of the range draws without replacement and without listing every pair.
    indices = rng.sample(range(operand_range**2), settings.n_train + settings.n_test)
    pairs = [divmod(index, operand_range) for index in indices]
    return pairs[settings.n_test :], pairs[: settings.n_test]


def encode_pairs(pairs: list[tuple[int, int]], settings: EmergenceSettings) -> torch.Tensor:
    """Return the (n_pairs, sequence_length) token ids of the examples for ``pairs``."""
    examples = [format_example(a, b, settings.digits, settings.reverse_answer) for a, b in pairs]
    return torch.tensor([encode(example) for example in examples], dtype=torch.long)


def answer_targets(tokens: torch.Tensor, settings: EmergenceSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, targets) for next-token training, targets -100 everywhere except the answer and end token."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()  # each (batch, sequence_length - 1)
    targets[:, : settings.prompt_length - 1] = -100  # position i predicts token i + 1
    return inputs, targets


def model_config(size: ModelSize, settings: EmergenceSettings) -> GPTConfig:
    """Return the GPT config of one sweep size."""
    return GPTConfig(
        vocab_size=len(VOCABULARY),
        max_seq_len=settings.sequence_length - 1,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
    )


def train_on_answers(model: GPT, train_tokens: torch.Tensor, settings: EmergenceSettings) -> tuple[float, float]:
    """Train ``model`` on random batches of ``train_tokens`` with the loss on the answers only.

    AdamW with warm-up and cosine decay to lr / 10 and gradients clipped at norm 1.0, as in
    ``minformer.experiments.common.train_gpt``. Returns (mean loss of the last 50 steps, seconds).
    """
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, (0.9, 0.99))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    start = time.perf_counter()
    recent_losses = deque(maxlen=50)

    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.lr, settings.lr / 10, settings.warmup_steps, settings.steps)
        rows = torch.randint(len(train_tokens), (settings.batch_size,), generator=generator)
        inputs, targets = answer_targets(train_tokens[rows], settings)
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses.append(float(loss.detach()))

    model.eval()
    return sum(recent_losses) / len(recent_losses), time.perf_counter() - start


def answer_span(settings: EmergenceSettings) -> slice:
    """Return the positions of the answer digits within an example."""
    return slice(settings.prompt_length, settings.prompt_length + settings.answer_digits)


@torch.no_grad()
def teacher_forced_scores(model, tokens: torch.Tensor, settings: EmergenceSettings) -> dict[str, torch.Tensor]:
    """Score the true answer digits of ``tokens`` (n, sequence_length) given the true earlier tokens.

    Returns ``log_probs``, the log-probability of each true digit, and ``forced_correct``, whether
    the argmax at that position is the true digit, each (n, answer_digits).
    """
    span = answer_span(settings)
    true_digits = tokens[:, span]
    # Position i predicts token i + 1, so the answer's logits sit one position before the answer.
    logits = model(tokens[:, : span.stop - 1]).logits[:, span.start - 1 : span.stop - 1]
    logits = logits.float()  # (n, answer_digits, vocab)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, true_digits.unsqueeze(-1)).squeeze(-1)
    return {"log_probs": log_probs, "forced_correct": logits.argmax(dim=-1) == true_digits}


@torch.no_grad()
def greedy_answers(model, tokens: torch.Tensor, settings: EmergenceSettings) -> torch.Tensor:
    """Return the (n, answer_digits) tokens that greedy decoding writes after each prompt of ``tokens``.

    Decoding uses minformer's ``generate`` with the KV cache and never stops early, so every row
    gets exactly ``answer_digits`` tokens (an end token written too early counts as a wrong digit).
    """
    prompts = tokens[:, : settings.prompt_length]
    return generate(model, prompts, settings.answer_digits, temperature=0.0)[:, settings.prompt_length :]


def score_answers(model, tokens: torch.Tensor, settings: EmergenceSettings) -> dict[str, torch.Tensor]:
    """Score the answers of ``tokens`` in batches: the ``teacher_forced_scores`` and ``greedy_correct``.

    ``greedy_correct`` (n, answer_digits) is True where greedy decoding wrote the true digit.
    """
    span = answer_span(settings)
    scores = {"log_probs": [], "forced_correct": [], "greedy_correct": []}
    for start in range(0, len(tokens), settings.eval_batch_size):
        batch = tokens[start : start + settings.eval_batch_size]
        for name, value in teacher_forced_scores(model, batch, settings).items():
            scores[name].append(value)
        scores["greedy_correct"].append(greedy_answers(model, batch, settings) == batch[:, span])
    return {name: torch.cat(parts) for name, parts in scores.items()}


def summarise_scores(log_probs: torch.Tensor, forced_correct: torch.Tensor, greedy_correct: torch.Tensor) -> dict:
    """Reduce per-digit scores, each (n_answers, answer_digits), to the experiment's metrics."""
    if not (log_probs.shape == forced_correct.shape == greedy_correct.shape) or log_probs.dim() != 2:
        raise ValueError(
            "log_probs, forced_correct and greedy_correct must share one (n_answers, answer_digits) shape, got "
            f"{tuple(log_probs.shape)}, {tuple(forced_correct.shape)} and {tuple(greedy_correct.shape)}."
        )
    return {
        "exact_match": float(greedy_correct.all(dim=1).float().mean()),
        "per_digit_greedy": float(greedy_correct.float().mean()),
        "per_digit_forced": float(forced_correct.float().mean()),
        "exact_match_forced": float(forced_correct.all(dim=1).float().mean()),
        "log_likelihood_per_digit": float(log_probs.mean()),
        "log_likelihood_per_answer": float(log_probs.sum(dim=1).mean()),
        "greedy_accuracy_by_position": greedy_correct.float().mean(dim=0).tolist(),
        "forced_accuracy_by_position": forced_correct.float().mean(dim=0).tolist(),
    }


def run_emergence(
    out_dir: Path, quick: bool = False, settings: EmergenceSettings | None = None, on_progress=None
) -> dict:
    """Train and score every size; write results.json, table.md and emergence.png into ``out_dir``.

    ``settings`` overrides the full or quick sizes; ``on_progress`` receives one line of text per size.
    """
    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"Output folder {out_dir} is a file; pass a folder path (--out) for results.json, table.md "
            "and emergence.png."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = split_pairs(settings)
    train_tokens = encode_pairs(train_pairs, settings)
    test_tokens = encode_pairs(test_pairs, settings)

    start = time.perf_counter()
    rows = []
    for size in settings.sizes:
        torch.manual_seed(settings.seed)
        model = GPT(model_config(size, settings))
        train_loss, seconds = train_on_answers(model, train_tokens, settings)
        metrics = summarise_scores(**score_answers(model, test_tokens, settings))
        rows.append({
            "size": size.name, **asdict(size), "parameters": count_parameters(model),
            "non_embedding_parameters": count_parameters(model, non_embedding=True),
            "train_loss": train_loss, "train_seconds": seconds, **metrics,
        })
        line = (
            f"{size.name} ({rows[-1]['parameters']:,} parameters): exact match {metrics['exact_match']:.3f}, "
            f"per-digit {metrics['per_digit_greedy']:.3f}, log-likelihood {metrics['log_likelihood_per_digit']:.3f} "
            f"nats/digit, trained in {seconds:.0f} s"
        )
        logger.info(line)
        if on_progress is not None:
            on_progress(line)

    results = {
        "settings": asdict(settings), "answer_digits": settings.answer_digits,
        "examples_trained": settings.steps * settings.batch_size,
        "total_seconds": time.perf_counter() - start, "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "table.md").write_text(format_table(results), encoding="utf-8")
    plot_emergence(results, out_dir / "emergence.png")
    return results


def format_table(results: dict) -> str:
    """Return a Markdown table with one row per model size."""
    settings = results["settings"]
    lines = [
        f"{settings['digits']}-digit addition ({results['answer_digits']}-digit answers, "
        f"{'least' if settings['reverse_answer'] else 'most'} significant digit first), "
        f"{settings['n_test']:,} held-out sums; every model trained for {settings['steps']:,} steps of "
        f"{settings['batch_size']} sums ({results['examples_trained']:,} examples). Exact match and per-digit "
        "(greedy) decode greedily from the prompt; per-digit (forced) is the teacher-forced argmax; "
        "log-likelihoods are teacher forced, in nats.",
        "",
        "| size | params | exact match | per-digit (greedy) | per-digit (forced) | log-lik / digit "
        "| log-lik / answer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['size']} | {row['parameters']:,} | {row['exact_match']:.3f} | {row['per_digit_greedy']:.3f} | "
            f"{row['per_digit_forced']:.3f} | {row['log_likelihood_per_digit']:.3f} | "
            f"{row['log_likelihood_per_answer']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_emergence(results: dict, path: Path) -> None:
    """Draw exact match, per-digit accuracy and log-likelihood against parameters, side by side."""
    from minformer.plots import plt

    rows = results["rows"]
    parameters = [row["parameters"] for row in rows]
    answer_digits = results["answer_digits"]
    figure, (match_axes, digit_axes, likelihood_axes) = plt.subplots(1, 3, figsize=(13, 4))

    match_axes.plot(parameters, [row["exact_match"] for row in rows], "o-", label="exact match (greedy)")
    # Schaeffer et al. 2023: with independent errors and per-token accuracy p, an answer of L tokens is
    # right with probability p^L. Positions differ in difficulty, so the product over positions is also drawn.
    same_accuracy = [row["per_digit_forced"] ** answer_digits for row in rows]
    by_position = [math.prod(row["forced_accuracy_by_position"]) for row in rows]
    match_axes.plot(parameters, same_accuracy, "s--", alpha=0.7, label=f"per-digit (forced)^{answer_digits}")
    match_axes.plot(parameters, by_position, "^:", alpha=0.7, label="product of per-position accuracies (forced)")
    match_axes.set_ylabel("share of test sums")
    match_axes.set_title("exact match")

    digit_axes.plot(parameters, [row["per_digit_greedy"] for row in rows], "o-", label="greedy")
    digit_axes.plot(parameters, [row["per_digit_forced"] for row in rows], "s--", label="teacher forced")
    digit_axes.axhline(0.1, color="grey", linestyle=":", label="chance (1 in 10)")
    digit_axes.set_ylabel("share of answer digits")
    digit_axes.set_title("per-digit accuracy")

    likelihood_axes.plot(parameters, [row["log_likelihood_per_digit"] for row in rows], "o-", label="per digit")
    likelihood_axes.axhline(math.log(0.1), color="grey", linestyle=":", label="uniform over 10 digits")
    likelihood_axes.set_ylabel("mean log-likelihood (nats per answer digit)")
    likelihood_axes.set_title("answer log-likelihood (teacher forced)")

    for axes, corner in ((match_axes, "center left"), (digit_axes, "lower right"), (likelihood_axes, "lower right")):
        axes.set_xscale("log")
        axes.set_xlabel("parameters")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc=corner)
    for axes in (match_axes, digit_axes):
        axes.set_ylim(-0.03, 1.03)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
