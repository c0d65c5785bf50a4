"""What the paper prescribes, and its rivals: regularizers (optax), unit recycling, resets.

Each named method (``catalog.METHODS``) is a ``Method`` of these pieces, which the trainers
drive through one interface (``method.Method``).
"""

from spectral_plasticity.methods.effective_rank import (
    erank_ascent,
    erank_gradient,
    erank_penalty,
    mean_effective_rank,
    select_layers,
)
from spectral_plasticity.methods.method import Method, StepInputs
from spectral_plasticity.methods.recycling import (
    CBPState,
    cbp_init,
    cbp_step,
    recycle,
    redo_step,
)
from spectral_plasticity.methods.regularizers import (
    l2_init,
    parseval,
    parseval_penalty,
    shrink_perturb,
    spectral_norm_reg,
    spectral_reg,
)
from spectral_plasticity.methods.resets import reset_all, reset_head

__all__ = [
    "CBPState",
    "Method",
    "StepInputs",
    "cbp_init",
    "cbp_step",
    "erank_ascent",
    "erank_gradient",
    "erank_penalty",
    "l2_init",
    "mean_effective_rank",
    "parseval",
    "parseval_penalty",
    "recycle",
    "redo_step",
    "reset_all",
    "reset_head",
    "select_layers",
    "shrink_perturb",
    "spectral_norm_reg",
    "spectral_reg",
]
