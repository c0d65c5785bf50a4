"""The JAX settings our entry points make (``spectral_plasticity.runtime``); a user's own choice
wins."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from spectral_plasticity import runtime

FIXTURE = Path(__file__).parent / "copy_insertion_fixture.py"
REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"

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


def test_xla_flags_are_added_once_and_a_user_choice_is_kept(monkeypatch):
    ours = [f"--{name}={value}" for name, value in runtime.CPU_XLA_FLAGS.items()]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    runtime.configure_runtime()
    runtime.configure_runtime()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", *ours]
    name = "--xla_cpu_enable_concurrency_optimized_scheduler"
    monkeypatch.setenv("XLA_FLAGS", f"{name}=true")
    runtime.configure_runtime()
    assert os.environ["XLA_FLAGS"].split() == [f"{name}=true", *ours[1:]]


def test_a_scan_step_does_not_copy_the_weights_it_updates():
    """The trainer's compiled chunk (vmapped seeds), under the flags the tests run with
    (conftest): no weight matrix is copied from the scan's carry (runtime docstring)."""
    spec = importlib.util.spec_from_file_location("copy_insertion_fixture", FIXTURE)
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    chunk, _ = fixture.compiled("bp")
    assert fixture.weight_copies(chunk) == 0


@pytest.mark.slow
def test_copy_insertion_with_region_analysis_changes_no_number(tmp_path):
    """The same chunks (BP; L2-ER with its ascent and the Hessian) in fresh interpreters with
    the flag off and on: bit-identical rows and weights, and the copy gone only with it."""
    results = {}
    for value in ("false", "true"):
        env = {**os.environ, "PYTHONPATH": str(FIXTURE.parents[1]), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--{REGION_ANALYSIS}={value}"}
        subprocess.run([sys.executable, str(FIXTURE), str(tmp_path / f"{value}.npz")], env=env,
                       check=True)
        results[value] = np.load(tmp_path / f"{value}.npz")
    off, on = results["false"], results["true"]
    assert int(off["copies"]) >= 1 and int(on["copies"]) == 0
    assert sorted(off.files) == sorted(on.files) and len(off.files) > 20
    for name in set(off.files) - {"copies"}:
        np.testing.assert_array_equal(off[name], on[name], err_msg=name)


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
