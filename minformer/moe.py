"""Mixture-of-experts feed-forward layer: a router, top-k routing, expert capacity and balancing losses.

Each token's hidden vector goes to the ``top_k`` experts with the highest router logits, and the
layer returns the gate-weighted sum of those experts' outputs (Shazeer et al. 2017).

- top_k = 1 is the Switch Transformer (Fedus et al. 2021): the gate is the router's
  softmax probability of the chosen expert over all experts, not renormalised.
- top_k >= 2 follows Mixtral (Jiang et al. 2024): the gates are a softmax over the
  k chosen logits, so they sum to one.
- Capacity (Fedus et al. 2021): with ``capacity_factor`` set, each expert takes at most
  ceil(capacity_factor * tokens * top_k / n_experts) assignments and drops the rest. A dropped
  assignment contributes zero, so a token with no kept assignment leaves the layer as zeros and
  passes through the block's residual connection unchanged.
- Load balancing (Fedus et al. 2021): coef * n_experts * sum_i f_i * P_i, where f_i is the
  fraction of the tokens * top_k assignments routed to expert i, counted before capacity
  dropping, and P_i is the mean router probability of expert i. Uniform routing gives coef.
- Router z-loss (Zoph et al. 2022, "ST-MoE"): coef * mean over tokens of logsumexp(logits)^2.

The router runs in fp32 even under autocast, because its softmax decides discrete routing and
small logit errors flip choices (Fedus et al. 2021 call this selective precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minformer.feedforward import FeedForward


@dataclass
class MoEStats:
    """Routing statistics of one forward pass of one mixture-of-experts layer.

    ``balance_loss`` and ``z_loss`` are scalar tensors already multiplied by their coefficients,
    with gradients to the router; the other fields are detached.
    """

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_share: torch.Tensor
    """(n_experts,) fraction of the assignments routed to each expert, before capacity dropping (f_i)."""
    n_dropped: int
    """Assignments dropped because their expert was full."""
    dropped_fraction: float
    """n_dropped divided by the number of assignments (tokens * top_k)."""

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the weighted balancing and z losses."""
        return self.balance_loss + self.z_loss


def expert_capacity(capacity_factor: float | None, n_tokens: int, top_k: int, n_experts: int) -> int | None:
    """Return the most assignments one expert takes, or None for no limit (factor None or 0)."""
    if not capacity_factor:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch load-balancing loss without its coefficient: n_experts * sum_i f_i * P_i (Fedus et al. 2021).

    ``router_probs`` (tokens, n_experts) are softmax probabilities over all experts; ``expert_index``
    (tokens, top_k) are the chosen experts. f_i counts assignments, so it has no gradient, and the
    gradient reaches the router through P_i.
    """
    assignments = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(router_probs.dtype)
    fraction_routed = assignments / max(expert_index.numel(), 1)  # f_i, (n_experts,)
    mean_prob = router_probs.mean(dim=0)  # P_i, (n_experts,)
    return n_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss without its coefficient: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022)."""
    return torch.logsumexp(router_logits, dim=-1).square().mean()


class Router(nn.Linear):
    """Linear map d_model -> n_experts without bias, evaluated in fp32 whatever the autocast dtype."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__(d_model, n_experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return fp32 router logits (tokens, n_experts) for ``hidden`` (tokens, d_model)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.weight.float())


class MoEFeedForward(nn.Module):
    """A mixture of ``n_experts`` feed-forward networks, each token sent to its ``top_k`` best experts."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        bias: bool = True,
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.001,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} is invalid; it must be between 1 and n_experts={n_experts}.")
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.router = Router(d_model, n_experts)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff, activation, bias=bias) for _ in range(n_experts))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts: returns (router_probs (tokens, n_experts), expert_index (tokens, k), gates (tokens, k))."""
        router_probs = router_logits.softmax(dim=-1)
        top_logits, expert_index = router_logits.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            gates = router_probs.gather(-1, expert_index)  # Switch: the probability itself
        else:
            gates = top_logits.softmax(dim=-1)  # Mixtral: renormalised over the chosen k
        return router_probs, expert_index, gates

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """Apply the experts to ``hidden`` (..., d_model); returns (output of the same shape, stats)."""
        shape = hidden.shape
        tokens = hidden.reshape(-1, shape[-1])  # (n_tokens, d_model)
        n_tokens = tokens.size(0)

        router_logits = self.router(tokens)  # (n_tokens, n_experts), fp32
        router_probs, expert_index, gates = self.route(router_logits)

        # Assignments are in choice-major order, as in GShard (Lepikhin et al. 2020): every token's
        # first choice in token order, then every second choice, and so on. So under capacity
        # pressure a first choice is never dropped in favour of another token's second choice.
        assigned_expert = expert_index.t().reshape(-1)  # (k * n_tokens,)
        assigned_token = torch.arange(n_tokens, device=tokens.device).repeat(self.top_k)
        assigned_gate = gates.t().reshape(-1)

        # A stable sort groups the assignments by expert and keeps their order inside each group,
        # so the first `capacity` entries of a group are the ones an expert keeps.
        order = torch.argsort(assigned_expert, stable=True)
        counts = torch.bincount(assigned_expert, minlength=self.n_experts).tolist()
        # NOTE: capacity scales with the tokens of this call, so cached decoding (one token per call)
        # can keep assignments that a full forward drops. Padding tokens are routed and counted too.
        capacity = expert_capacity(self.capacity_factor, n_tokens, self.top_k, self.n_experts)

        kept_slots, expert_outputs = [], []
        start = 0
        for expert, count in zip(self.experts, counts):
            kept = count if capacity is None else min(count, capacity)
            slots = order[start : start + kept]  # positions in the assignment list
            start += count
            if kept == 0:
                continue
            output = expert(tokens[assigned_token[slots]]) * assigned_gate[slots, None]
            kept_slots.append(slots)
            expert_outputs.append(output.to(tokens.dtype))

        # Each assignment writes its own row, and rows are summed per token afterwards, so the
        # result does not depend on the order in which the experts ran.
        per_assignment = tokens.new_zeros(self.top_k * n_tokens, shape[-1])
        if kept_slots:
            per_assignment = per_assignment.index_copy(0, torch.cat(kept_slots), torch.cat(expert_outputs))
        output = per_assignment.view(self.top_k, n_tokens, shape[-1]).sum(dim=0)

        n_assignments = self.top_k * n_tokens
        n_dropped = sum(max(count - capacity, 0) for count in counts) if capacity is not None else 0
        stats = MoEStats(
            balance_loss=self.balance_coef * load_balancing_loss(router_probs, expert_index, self.n_experts),
            z_loss=self.z_loss_coef * router_z_loss(router_logits),
            expert_share=torch.tensor(counts, dtype=torch.float32) / max(n_assignments, 1),
            n_dropped=n_dropped,
            dropped_fraction=n_dropped / max(n_assignments, 1),
        )
        return output.view(shape), stats


def moe_metrics(moe_stats: dict[int, MoEStats]) -> dict[str, float]:
    """Flatten per-layer stats into floats for a metrics record.

    ``moe_balance_loss`` and ``moe_z_loss`` are summed over layers, ``moe_dropped_fraction`` is the
    mean over layers, and ``moe_layer{L}_expert{E}_share`` is expert E's share of layer L's
    assignments, L being the block index.
    """
    if not moe_stats:
        return {}
    metrics = {
        "moe_balance_loss": sum(float(stats.balance_loss.detach()) for stats in moe_stats.values()),
        "moe_z_loss": sum(float(stats.z_loss.detach()) for stats in moe_stats.values()),
        "moe_dropped_fraction": sum(stats.dropped_fraction for stats in moe_stats.values()) / len(moe_stats),
    }
    for layer, stats in moe_stats.items():
        for expert, share in enumerate(stats.expert_share.tolist()):
            metrics[f"moe_layer{layer}_expert{expert}_share"] = share
    return metrics
