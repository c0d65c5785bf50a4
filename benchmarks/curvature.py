"""Curvature speed: HVP vs gradient, Lanczos overhead, top-5 and trace against PyHessian, and
compile times.

    python benchmarks/curvature.py             # MLP 784-1000-1000-1000-10, 2,000 examples
    python benchmarks/curvature.py --quick     # a small MLP, for a smoke run
    python benchmarks/curvature.py --compile   # only the compile times (see compile_times)

Every figure is a ratio of two timings taken in this one run (median of repeats). Compile time
is measured on its own, ahead of time (``jax.jit(f).lower(...).compile()``), never as the first
call (which is compile plus one run). The data are 2,000 Fashion-MNIST training images when
/usr/share/datasets/fashion-mnist holds them, otherwise Gaussian inputs with random labels (the
timings do not depend on the values). PyHessian (PyTorch, CPU) gets the same weights and data.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from spectral_plasticity import experiment, reproduce
from spectral_plasticity.curvature import (
    dataset_operator,
    hessian_operator,
    hessian_trace,
    hvp,
    lanczos,
    spectral_density,
    top_eigenvalues,
)
from spectral_plasticity.models import MLP
from spectral_plasticity.train.sweep import hparam_grid

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
LANCZOS_STEPS = 100
# The CPU study whose trainer chunk's compile time is reported (reproduce.CPU_STUDIES).
CPU_STUDY = "permuted_fashion_mnist"


class Setup(NamedTuple):
    """The benchmark's model, data and loss (``loss`` closes over all ``n`` examples)."""

    widths: tuple[int, ...]
    model: MLP
    params: Any
    inputs: np.ndarray
    labels: np.ndarray
    loss: Callable[[Any], jax.Array]
    key: jax.Array
    repeats: int


def load_inputs(n: int, dim: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray, str]:
    if dim == 784 and FASHION.exists():
        with gzip.open(FASHION) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)[:n]
        with gzip.open(FASHION.with_name("train-labels-idx1-ubyte.gz")) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        return images.astype(np.float32) / 255.0, labels.astype(np.int32), "Fashion-MNIST"
    kx, ky = jax.random.split(key)
    return (np.asarray(jax.random.normal(kx, (n, dim))),
            np.asarray(jax.random.randint(ky, (n,), 0, 10)), "synthetic Gaussian")


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` (its result blocked on), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float, float]:
    """``fn`` jitted and compiled for ``args``, with the seconds of tracing and lowering, and
    of XLA's compilation (optimization passes and code generation)."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter()
    executable = lowered.compile()
    return executable, traced - start, time.perf_counter() - traced


def setup(quick: bool, repeats: int) -> Setup:
    widths = (784, 100, 100, 10) if quick else (784, 1000, 1000, 1000, 10)
    n = 500 if quick else 2000
    key = jax.random.key(0)
    inputs, labels, source = load_inputs(n, widths[0], key)
    model = MLP(hidden_sizes=widths[1:-1], num_outputs=widths[-1])
    params = model.init(key, inputs[:1])["params"]
    x, y = jnp.asarray(inputs), jnp.asarray(labels)

    def loss(p):
        logits = model.apply({"params": p}, x)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    dim = ravel_pytree(params)[0].size
    print(f"MLP {'-'.join(map(str, widths))} ({dim:,} parameters), {n} examples ({source}), "
          f"float32, {jax.devices()[0].platform}, median of {repeats}")
    return Setup(widths, model, params, inputs, labels, loss, key, repeats)


def bench_products(s: Setup) -> tuple[float, Callable[[], object]]:
    """Prints HVP / gradient; returns the HVP's seconds and a function running it."""
    v = jax.tree.map(jnp.ones_like, s.params)
    grad_exe, _, c_grad = compiled(jax.grad(s.loss), s.params)
    hvp_exe, _, c_hvp = compiled(lambda p, v: hvp(s.loss, p, v), s.params, v)
    run_hvp = lambda: hvp_exe(s.params, v)
    t_grad, t_hvp = timeit(lambda: grad_exe(s.params), s.repeats), timeit(run_hvp, s.repeats)
    print(f"gradient {t_grad * 1e3:.0f} ms, HVP {t_hvp * 1e3:.0f} ms -> "
          f"HVP / gradient = {t_hvp / t_grad:.2f}  (target <= 3; compile {c_grad:.1f}s, "
          f"{c_hvp:.1f}s)")
    return t_hvp, run_hvp


def bench_lanczos(s: Setup, t_hvp: float, run_hvp: Callable[[], object]) -> None:
    """Prints Lanczos / (m x HVP) and the SLQ density's time."""
    v0 = jax.random.normal(s.key, (ravel_pytree(s.params)[0].size,))
    lanczos_exe, _, c_lanczos = compiled(
        lambda p, v0: lanczos(hessian_operator(s.loss, p).matvec, v0, LANCZOS_STEPS), s.params, v0)
    t_lanczos = timeit(lambda: lanczos_exe(s.params, v0), max(1, s.repeats // 3))
    # The HVP is timed again right after, so a change in machine load between the two
    # measurements shows (on a shared machine it can move either by 2x).
    t_hvp_after = timeit(run_hvp, s.repeats)
    m = LANCZOS_STEPS
    print(f"Lanczos({m}) {t_lanczos:.1f} s -> Lanczos / ({m} x HVP) = "
          f"{t_lanczos / (m * t_hvp):.3f}, {t_lanczos / (m * t_hvp_after):.3f} with the HVP "
          f"re-timed after it ({t_hvp_after * 1e3:.0f} ms)  (target <= 1.20; compile "
          f"{c_lanczos:.1f}s = {c_lanczos / t_lanczos:.1%} of the run)")
    slq_exe, _, _ = compiled(lambda p: spectral_density(s.loss, p, key=s.key,
                                                        num_iters=m).density, s.params)
    t_slq = timeit(lambda: slq_exe(s.params), 1)
    print(f"SLQ density ({m} steps, 1 probe, 10,000-point grid) {t_slq:.1f} s -> "
          f"SLQ / ({m} x HVP) = {t_slq / (m * t_hvp):.3f}  (PyHessian's density() does "
          "not run on current torch)")


def pyhessian_setup(s: Setup):
    """PyHessian on the same weights and data, or None when torch/PyHessian are missing."""
    try:
        import torch
        from pyhessian import hessian as PyHessian
    except ImportError:
        print("PyHessian/torch not installed: `make bench` installs them (bench extra)")
        return None
    torch.manual_seed(0)  # PyHessian draws its power-iteration and Hutchinson probes from torch
    layers = []
    names = [f"hidden_{i}" for i in range(len(s.widths) - 2)] + ["head"]
    for i, name in enumerate(names):
        linear = torch.nn.Linear(s.widths[i], s.widths[i + 1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.asarray(s.params[name]["kernel"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(s.params[name]["bias"]).copy()))
        layers.append(linear)
        if name != "head":
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).eval()
    data = (torch.from_numpy(s.inputs.copy()), torch.from_numpy(s.labels.astype(np.int64)))
    return PyHessian(model, torch.nn.CrossEntropyLoss(), data=data, cuda=False)


def bench_top5(s: Setup, ph) -> None:
    """Top-5 eigenvalues: reference = 100 Lanczos steps. PyHessian runs first (seeded); ours
    then takes the fewest Lanczos steps (of a ladder) whose top-5 are at least as accurate as
    PyHessian's (1e-3 relative when PyHessian is absent), and both are timed."""
    reference = np.asarray(top_eigenvalues(s.loss, s.params, 5, key=s.key,
                                           num_iters=LANCZOS_STEPS)[0])
    tolerance = 1e-3
    if ph is not None:
        start = time.perf_counter()
        ph_values, _ = ph.eigenvalues(maxIter=100, tol=1e-3, top_n=5)
        t_ph_top = time.perf_counter() - start
        ph_sorted = np.sort(np.asarray(ph_values))[::-1]
        tolerance = float(np.max(np.abs(ph_sorted - reference) / np.abs(reference)))
        print(f"top-5 eigenvalues (PyHessian, power iteration tol 1e-3): "
              f"{np.array2string(ph_sorted, precision=4)} (max rel. err {tolerance:.1e} vs "
              f"{LANCZOS_STEPS} Lanczos steps) in {t_ph_top:.1f} s")
    for steps in (8, 10, 12, 15, 20, 30, 40, 60, 80, 100):
        top_fn = jax.jit(lambda p, m=steps: top_eigenvalues(s.loss, p, 5, key=jax.random.key(1),
                                                            num_iters=m)[0])
        values = np.asarray(top_fn(s.params))
        error = np.max(np.abs(values - reference) / np.abs(reference))
        if error <= tolerance or steps == LANCZOS_STEPS:
            t_top = timeit(lambda f=top_fn: f(s.params), max(1, s.repeats // 3))
            break
    print(f"top-5 eigenvalues (ours, {steps} Lanczos steps, max rel. err {error:.1e} vs "
          f"{LANCZOS_STEPS} steps): {np.array2string(values, precision=4)} in {t_top:.1f} s")
    if ph is not None:
        print(f"-> top-5 speed-up over PyHessian = {t_ph_top / t_top:.1f}x at "
              f"{'equal or better' if error <= tolerance else 'lower'} accuracy (target >= 5x)")


def bench_trace(s: Setup, ph) -> None:
    """Hutchinson's trace estimate, ours (100 probes) and PyHessian's, time per probe."""
    trace_exe, _, _ = compiled(lambda p: hessian_trace(s.loss, p, key=s.key, num_samples=100,
                                                       batch_size=10), s.params)
    t_trace = timeit(lambda: trace_exe(s.params), 1)
    trace, stderr = (float(t) for t in trace_exe(s.params))
    print(f"Hutchinson trace (ours, 100 probes): {trace:.4g} +- {stderr:.2g} in {t_trace:.1f} s")
    if ph is None:
        return
    start = time.perf_counter()
    ph_trace = ph.trace(maxIter=100, tol=1e-3)
    t_ph_trace = time.perf_counter() - start
    per_probe_ph = t_ph_trace / len(ph_trace)
    print(f"Hutchinson trace (PyHessian, {len(ph_trace)} probes): {np.mean(ph_trace):.4g} in "
          f"{t_ph_trace:.1f} s -> time per probe, PyHessian / ours = "
          f"{per_probe_ph / (t_trace / 100):.1f}x")


def trainer_chunk_compile(*overrides: str) -> float:
    """Seconds XLA takes to compile one chunk of the CPU study's trainer (its overrides, then
    ``overrides``; its first method; one run, vmapped as ``run_sweep`` stacks runs)."""
    study = next(st for st in reproduce.CPU_STUDIES if st.experiment == CPU_STUDY)
    config = experiment.load_config(CPU_STUDY, "small")
    for assignment in (*study.overrides, *overrides):
        experiment.apply_override(config, assignment)
    config = experiment.method_config(config, study.methods[0])
    trainer = experiment.make_trainer(config)
    point = hparam_grid(dict(config.sweep))[0] if config.sweep else {}
    hparams = {k: jnp.asarray([v], jnp.float32) for k, v in point.items()}
    data = (trainer.data,) if trainer.data else ()
    state = jax.jit(jax.vmap(trainer.init))(jax.random.split(jax.random.key(0), 1), hparams)
    chunk = jax.vmap(trainer.run_chunk, in_axes=(0, 0, None) if data else (0, 0))
    return compiled(chunk, state, hparams, *data)[2]


def compile_times(s: Setup) -> None:
    """Compile against run time of Lanczos(100) over the chunked data operator (100 examples a
    chunk, as the trainers measure), and the compile time of a CPU study's trainer chunk, with
    and without its Hessian measurements."""
    apply = lambda p, x: s.model.apply({"params": p}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels
    program = lambda p, x, y, v0: lanczos(dataset_operator(apply, ce, p, (x, y), chunk_size=100)
                                          .matvec, v0, LANCZOS_STEPS).alphas
    args = (s.params, jnp.asarray(s.inputs), jnp.asarray(s.labels),
            jax.random.normal(s.key, (ravel_pytree(s.params)[0].size,)))
    exe, lower_s, compile_s = compiled(program, *args)
    run_s = timeit(lambda: exe(*args), 1)
    print(f"Lanczos({LANCZOS_STEPS}) over the data operator ({len(s.labels)} examples, chunks "
          f"of 100): trace+lower {lower_s:.2f} s, compile {compile_s:.2f} s, run {run_s:.1f} s "
          f"-> compile / run = {compile_s / run_s:.1%}  (target <= 10%)")
    with_hessian, without = trainer_chunk_compile(), trainer_chunk_compile("measure_hessian=False")
    print(f"trainer chunk of the CPU study ({CPU_STUDY}, small scale): compile "
          f"{with_hessian:.1f} s, {without:.1f} s without its Hessian measurements")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small MLP, 500 examples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pyhessian", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--compile", action="store_true", help="only the compile times")
    args = parser.parse_args()
    s = setup(args.quick, args.repeats)
    if not args.compile:
        t_hvp, run_hvp = bench_products(s)
        bench_lanczos(s, t_hvp, run_hvp)
        ph = None if args.no_pyhessian else pyhessian_setup(s)
        bench_top5(s, ph)
        bench_trace(s, ph)
    compile_times(s)


if __name__ == "__main__":
    main()
