"""Scaling-law tools: parameter and FLOP accounting, the published Chinchilla laws, and their fits.

``accounting`` counts parameters and training FLOPs (Kaplan et al. 2020; Hoffmann et al. 2022,
Appendix F); ``chinchilla`` gives compute-optimal allocations under the published laws; ``fitting``
fits Approaches 2 and 3 of Hoffmann et al. 2022 to your own runs.
"""

from minformer.scaling.accounting import (
    CONVENTIONS,
    config_parameters,
    count_parameters,
    flops_per_token,
    training_flops,
)
from minformer.scaling.chinchilla import (
    APPROACH1_TABLE,
    GOPHER_FLOPS,
    LAWS,
    Allocation,
    LossLaw,
    approach1_optimal,
    interpolate_approach1,
)

__all__ = [
    "APPROACH1_TABLE",
    "CONVENTIONS",
    "GOPHER_FLOPS",
    "LAWS",
    "Allocation",
    "LossLaw",
    "approach1_optimal",
    "config_parameters",
    "count_parameters",
    "flops_per_token",
    "interpolate_approach1",
    "training_flops",
]
