"""Shared test settings: CPU, float32, deterministic keys."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
