"""What the paper measures: Hessian and GGN products, Lanczos, spectra, epsilon-rank; KFAC
factors and their spectra, the loss-weighted Gram matrix, the dead-unit rank bound."""

from spectral_plasticity.curvature.capture import (
    LayerStatistics,
    conv_patches,
    layer_inputs,
    layer_statistics,
    nnx_functional,
)
from spectral_plasticity.curvature.comparison import (
    SpectrumComparison,
    compare_spectra,
    wasserstein_distance,
)
from spectral_plasticity.curvature.cotangents import (
    output_cotangents,
    sample_categorical,
    sample_gaussian,
)
from spectral_plasticity.curvature.dead_units import DeadUnitBound, dead_unit_bound, dead_units
from spectral_plasticity.curvature.factors import (
    KroneckerFactors,
    kfac_factors,
    kfac_matrix,
    layer_matrix,
)
from spectral_plasticity.curvature.gram import loss_weighted_gram, psd_sqrt
from spectral_plasticity.curvature.kfac import kfac_diagnostics
from spectral_plasticity.curvature.kronecker import (
    BlockRanks,
    KroneckerSpectrum,
    block_ranks,
    kronecker_spectrum,
    numerical_rank,
    relative_epsilon_rank,
    spectrum_effective_rank,
)
from spectral_plasticity.curvature.lanczos import (
    LanczosResult,
    RitzPairs,
    lanczos,
    ritz_pairs,
    tridiagonal,
)
from spectral_plasticity.curvature.layer_blocks import kfac_operator, layer_operator
from spectral_plasticity.curvature.operators import (
    CurvatureOperator,
    chunk_dataset,
    dataset_loss,
    dataset_operator,
    ggn_operator,
    ggn_vp,
    hessian_operator,
    hvp,
    selection_mask,
)
from spectral_plasticity.curvature.spectrum import (
    EPSILON_RANK_COLUMNS,
    FractionBounds,
    SpectralDensity,
    epsilon_count,
    epsilon_rank,
    epsilon_rank_bounds,
    epsilon_rank_record,
    fast_fraction_bounds,
    fast_threshold,
    hessian_trace,
    smoothed_epsilon_rank,
    spectral_density,
    tau_trainability,
    top_eigenvalues,
)

__all__ = [
    "EPSILON_RANK_COLUMNS",
    "BlockRanks",
    "CurvatureOperator",
    "DeadUnitBound",
    "FractionBounds",
    "KroneckerFactors",
    "KroneckerSpectrum",
    "LanczosResult",
    "LayerStatistics",
    "RitzPairs",
    "SpectralDensity",
    "SpectrumComparison",
    "block_ranks",
    "chunk_dataset",
    "compare_spectra",
    "conv_patches",
    "dataset_loss",
    "dataset_operator",
    "dead_unit_bound",
    "dead_units",
    "epsilon_count",
    "epsilon_rank",
    "epsilon_rank_bounds",
    "epsilon_rank_record",
    "fast_fraction_bounds",
    "fast_threshold",
    "ggn_operator",
    "ggn_vp",
    "hessian_operator",
    "hessian_trace",
    "hvp",
    "kfac_diagnostics",
    "kfac_factors",
    "kfac_matrix",
    "kfac_operator",
    "kronecker_spectrum",
    "lanczos",
    "layer_inputs",
    "layer_matrix",
    "layer_operator",
    "layer_statistics",
    "loss_weighted_gram",
    "nnx_functional",
    "numerical_rank",
    "output_cotangents",
    "psd_sqrt",
    "relative_epsilon_rank",
    "ritz_pairs",
    "sample_categorical",
    "sample_gaussian",
    "selection_mask",
    "smoothed_epsilon_rank",
    "spectral_density",
    "spectrum_effective_rank",
    "tau_trainability",
    "top_eigenvalues",
    "tridiagonal",
    "wasserstein_distance",
]
