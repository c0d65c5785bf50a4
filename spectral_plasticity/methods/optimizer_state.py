"""Zeroing the optimizer-state entries of chosen weights (moments of recycled or reset units).

Optimizer states mirror the parameters in places: Adam's ``mu`` and ``nu``, a momentum
``trace``, and so on — subtrees with the parameters' tree structure and leaf shapes. When units
are recycled or a layer is reset, those entries must restart from zero (Dohare et al. 2024;
Sokar et al. 2023). ``zero_param_entries`` finds every such subtree of an arbitrary optax state
by structure, so it needs neither the optimizer object nor a call of its ``init`` (unlike
``optax.tree_utils.tree_map_params``, which fails on transforms whose ``init`` inspects leaf
shapes, such as ``spectral_norm_reg``).

Subtrees that hold parameter *values* rather than statistics — the initial parameters kept by
``l2_init`` and by ``shrink_perturb(toward="init")`` — mirror the parameters too but are anchors,
not moments; they are left untouched (``ANCHOR_STATES``). Counters (e.g. Adam's ``count``) are
global and unchanged, so Adam's bias correction does not restart for the zeroed entries (Dohare
et al.'s AdamGnT keeps a per-weight step instead).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spectral_plasticity.methods.regularizers import L2InitState, ShrinkPerturbState

PyTree = Any

ANCHOR_STATES: tuple[type, ...] = (L2InitState, ShrinkPerturbState)


def _mirrors(tree: PyTree, params: PyTree) -> bool:
    """True when ``tree`` has the structure and leaf shapes of ``params``."""
    if jax.tree.structure(tree) != jax.tree.structure(params):
        return False
    return all(getattr(a, "shape", None) == b.shape
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True))


def zero_param_entries(opt_state: PyTree, params: PyTree, mask: PyTree) -> PyTree:
    """Zeros, in every subtree of ``opt_state`` that mirrors ``params``, the entries of ``mask``.

    Args:
      opt_state: any optax state for ``params``.
      params: the parameters (only their structure and shapes are read).
      mask: booleans shaped like ``params``; True marks the entries to zero.

    Returns:
      ``opt_state`` with those entries zeroed in its moment-like subtrees; anchors
      (``ANCHOR_STATES``) and non-mirroring leaves unchanged.
    """
    if jax.tree.structure(mask) != jax.tree.structure(params):
        raise ValueError("mask must have the tree structure of params")

    def is_leaf(node: PyTree) -> bool:
        return isinstance(node, ANCHOR_STATES) or _mirrors(node, params)

    def reset(node: PyTree) -> PyTree:
        if isinstance(node, ANCHOR_STATES) or not _mirrors(node, params):
            return node
        return jax.tree.map(lambda s, m: jnp.where(m, jnp.zeros_like(s), s), node, mask)

    return jax.tree.map(reset, opt_state, is_leaf=is_leaf)
