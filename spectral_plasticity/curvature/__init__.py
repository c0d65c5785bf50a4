"""What the paper measures: Hessian and GGN products, Lanczos, spectra, epsilon-rank."""

from spectral_plasticity.curvature.lanczos import (
    LanczosResult,
    RitzPairs,
    lanczos,
    ritz_pairs,
    tridiagonal,
)
from spectral_plasticity.curvature.operators import (
    CurvatureOperator,
    dataset_loss,
    dataset_operator,
    ggn_operator,
    ggn_vp,
    hessian_operator,
    hvp,
    selection_mask,
)
from spectral_plasticity.curvature.spectrum import (
    SpectralDensity,
    epsilon_rank,
    fast_threshold,
    hessian_trace,
    spectral_density,
    tau_trainability,
    top_eigenvalues,
)

__all__ = [
    "CurvatureOperator",
    "LanczosResult",
    "RitzPairs",
    "SpectralDensity",
    "dataset_loss",
    "dataset_operator",
    "epsilon_rank",
    "fast_threshold",
    "ggn_operator",
    "ggn_vp",
    "hessian_operator",
    "hessian_trace",
    "hvp",
    "lanczos",
    "ritz_pairs",
    "selection_mask",
    "spectral_density",
    "tau_trainability",
    "top_eigenvalues",
    "tridiagonal",
]
