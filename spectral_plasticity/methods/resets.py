"""Resets at task boundaries: the whole network (RESET) or its output layer (head reset).

RESET re-initializes every parameter and the optimizer state, i.e. trains each task from
scratch — the upper reference of plasticity the paper compares with. A head reset
re-initializes only the output layer and its optimizer moments, as the continual-ImageNet
protocol does at every task (Dohare et al. 2024).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from spectral_plasticity.methods.optimizer_state import zero_param_entries

PyTree = Any


def reset_all(fresh_params: PyTree, optimizer: optax.GradientTransformation
              ) -> tuple[PyTree, PyTree]:
    """``(fresh_params, optimizer.init(fresh_params))``: a network as at initialization."""
    return fresh_params, optimizer.init(fresh_params)


def reset_head(params: PyTree, opt_state: PyTree, fresh_params: PyTree, head: str = "head"
               ) -> tuple[PyTree, PyTree]:
    """Re-initializes layer ``head`` from ``fresh_params`` and zeroes its optimizer moments."""
    if head not in params:
        raise ValueError(f"unknown head layer {head!r}; the params have layers {sorted(params)}")
    params = {**params, head: fresh_params[head]}
    is_head = {name: jax.tree.map(lambda _, h=(name == head): h, sub)
               for name, sub in params.items()}
    return params, zero_param_entries(opt_state, params, is_head)
