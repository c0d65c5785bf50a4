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


def test_xla_flag_is_added_once_and_a_user_choice_is_kept(monkeypatch):
    import os

    name = "--xla_cpu_enable_concurrency_optimized_scheduler"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    runtime.configure_runtime()
    runtime.configure_runtime()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                               f"{name}=false"]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=true")
    runtime.configure_runtime()
    assert os.environ["XLA_FLAGS"] == f"{name}=true"


def _scipy_blas_threads() -> set[int]:
    import threadpoolctl

    return {i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas" and "scipy" in i["filepath"]}


def test_blas_runs_single_threaded_unless_the_user_chose(monkeypatch):
    """jaxlib's CPU LAPACK calls scipy's OpenBLAS from XLA's pool threads (runtime docstring)."""
    import threadpoolctl

    original = threadpoolctl.threadpool_limits(2, user_api="blas")
    try:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
        runtime.configure_runtime()
        assert _scipy_blas_threads() == {2}
        monkeypatch.delenv("OPENBLAS_NUM_THREADS")
        runtime.configure_runtime()
        assert _scipy_blas_threads() == {1}
    finally:
        original.restore_original_limits()
        runtime.single_threaded_blas()
