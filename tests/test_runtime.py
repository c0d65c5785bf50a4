"""The JAX settings our entry points make: CPU async dispatch off unless the user chose."""

import jax

from spectral_plasticity import runtime

FLAG = "jax_cpu_enable_async_dispatch"


def test_async_dispatch_is_off_unless_the_user_chose(monkeypatch):
    before = jax.config.values[FLAG]
    try:
        jax.config.update(FLAG, True)
        monkeypatch.delenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", raising=False)
        runtime.configure_runtime()
        assert jax.config.values[FLAG] is False
        jax.config.update(FLAG, True)
        monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "true")
        runtime.configure_runtime()
        assert jax.config.values[FLAG] is True
    finally:
        jax.config.update(FLAG, before)
