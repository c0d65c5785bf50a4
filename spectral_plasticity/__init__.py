"""spectral-plasticity: measure and prevent loss of plasticity in deep continual learning.

Implements "Spectral Collapse Drives Loss of Plasticity in Deep Continual Learning"
(He, Guo, Prakash et al., arXiv 2509.22335).
"""

from spectral_plasticity.methods import (
    cbp_init,
    cbp_step,
    erank_ascent,
    erank_penalty,
    l2_init,
    parseval,
    redo_step,
    reset_all,
    reset_head,
    shrink_perturb,
    spectral_norm_reg,
    spectral_reg,
)

__version__ = "0.1.0"

__all__ = [
    "cbp_init",
    "cbp_step",
    "erank_ascent",
    "erank_penalty",
    "l2_init",
    "parseval",
    "redo_step",
    "reset_all",
    "reset_head",
    "shrink_perturb",
    "spectral_norm_reg",
    "spectral_reg",
]
