"""Shared test settings: CPU, float32, deterministic keys."""

import os

from spectral_plasticity.runtime import configure_runtime

os.environ.setdefault("JAX_PLATFORMS", "cpu")
configure_runtime()
