"""Stress test for the XLA CPU stall: every method, KFAC on, many consecutive chunks; counts stalls.

    python benchmarks/stress_stall.py [--methods=bp,l2_er] [--chunks=30] [--seeds=3]
    python benchmarks/stress_stall.py --lapack      # the minimal reproducer of the BLAS cause

Each method runs as its own process: a supervised sweep of Permuted MNIST's small-scale model
(MLP 3x100, three seeds vmapped, KFAC diagnostics and the new-task Hessian measured in every
chunk) for ``--chunks`` chunks of one task each. A stall is the watchdog's exit 75 after
``--stall_seconds`` without CPU use; the script then resumes the run, as ``make sweep`` does, and
counts it. Without MNIST on the machine (``--data_dir``) the images are random IDX files of
MNIST's shapes with the checksum check skipped: a stall depends on the program, not the pixels.

``--lapack`` runs a vmapped ``jnp.linalg.svd`` in a loop, with scipy's OpenBLAS multi-threaded
(its default) and single-threaded (``runtime.configure_runtime``), each in a fresh process with
a time limit, and prints the loop's time per iteration or that it did not finish.

Not part of ``make test``: on a busy 2-core machine the full run takes hours.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", None, "Methods (default: every method of Permuted MNIST).")
flags.DEFINE_integer("chunks", 30, "Consecutive chunks (one task each) per method.")
flags.DEFINE_integer("seeds", 3, "Seeds vmapped in each run.")
flags.DEFINE_integer("train_size", 200, "Training images per task (batch 1: steps per task).")
flags.DEFINE_integer("stall_seconds", 60, "The watchdog's limit.")
flags.DEFINE_string("data_dir", "", "MNIST's IDX files; default: random ones of its shapes.")
flags.DEFINE_string("workdir", "", "Where runs go (default: a temporary directory).")
flags.DEFINE_string("one", "", "Internal: run this method's sweep in this process.")
flags.DEFINE_bool("lapack", False, "Run the minimal reproducer of the BLAS cause instead.")
flags.DEFINE_integer("lapack_seconds", 60, "Time limit of each --lapack loop.")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def random_mnist(directory: Path) -> Path:
    """Random images and labels in MNIST's four IDX files (2,000 train, 500 test)."""
    from spectral_plasticity.tasks.idx import FILES

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for key, shape in (("train_images", (2000, 28, 28)), ("train_labels", (2000,)),
                       ("test_images", (500, 28, 28)), ("test_labels", (500,))):
        _write_idx(directory / FILES[key], rng.integers(0, 10 if "labels" in key else 256, shape))
    return directory


def run_one(method: str, workdir: Path) -> None:
    """One method's sweep in this process (the watchdog exits 75 on a stall)."""
    from unittest import mock

    from spectral_plasticity import experiment, runtime
    from spectral_plasticity.tasks import idx

    runtime.configure_runtime()
    config = experiment.load_config("permuted_mnist", "small")
    config.kfac.enabled = True
    config.stream.num_tasks, config.tasks_per_chunk = FLAGS.chunks, 1
    config.stream.train_size = FLAGS.train_size
    config.seeds = FLAGS.seeds
    config.stream.data_dir = FLAGS.data_dir or str(random_mnist(workdir / "random_mnist"))
    skip_checksums = (contextlib.nullcontext() if FLAGS.data_dir
                      else mock.patch.object(idx, "_verify", lambda *a: None))
    with skip_checksums:
        trainer = experiment.make_trainer(experiment.method_config(config, method))
    from spectral_plasticity.train import run_sweep

    run_sweep(trainer, seeds=list(range(FLAGS.seeds)), hparams=[{}],
              run_dir=workdir / method, config=experiment.method_config(config, method).to_dict(),
              label=method, stall_seconds=FLAGS.stall_seconds)


def stress(methods: list[str], workdir: Path) -> None:
    print(f"{'method':16s} {'chunks':>6s} {'stalls':>6s} {'seconds':>8s}", flush=True)
    total = 0
    for method in methods:
        stalls, t0 = 0, time.perf_counter()
        args = [sys.executable, __file__, f"--one={method}", f"--workdir={workdir}",
                f"--chunks={FLAGS.chunks}", f"--seeds={FLAGS.seeds}",
                f"--train_size={FLAGS.train_size}", f"--stall_seconds={FLAGS.stall_seconds}",
                f"--data_dir={FLAGS.data_dir}"]
        while (rc := subprocess.run(args, stdout=subprocess.DEVNULL).returncode) == 75:
            stalls += 1
        if rc != 0:
            raise SystemExit(f"{method}: exited with {rc}")
        total += stalls
        print(f"{method:16s} {FLAGS.chunks:6d} {stalls:6d} {time.perf_counter() - t0:8.0f}",
              flush=True)
    print(f"stalls in total: {total} in {len(methods) * FLAGS.chunks} chunks", flush=True)


LAPACK_LOOP = """
import sys, time
import jax, jax.numpy as jnp
from spectral_plasticity import runtime
if sys.argv[1] == "single":
    runtime.single_threaded_blas()
svd = jax.jit(jax.vmap(lambda x: jnp.linalg.svd(x, compute_uv=False)))
x = jax.random.normal(jax.random.key(0), (3, 500, 100))
svd(x).block_until_ready()
t0 = time.perf_counter()
for i in range(50):
    svd(x + i).block_until_ready()
print(f"{(time.perf_counter() - t0) / 50 * 1e3:.1f} ms per vmapped svd")
"""


def lapack() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    for blas in ("multi", "single"):
        try:
            done = subprocess.run([sys.executable, "-c", LAPACK_LOOP, blas], env=env, text=True,
                                  capture_output=True, timeout=FLAGS.lapack_seconds)
            print(f"OpenBLAS {blas}-threaded: {done.stdout.strip() or done.stderr[-300:]}")
        except subprocess.TimeoutExpired:
            print(f"OpenBLAS {blas}-threaded: 50 vmapped svds did not finish in "
                  f"{FLAGS.lapack_seconds} s")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.lapack:
        return lapack()
    workdir = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="stress_stall_"))
    if FLAGS.one:
        return run_one(FLAGS.one, workdir)
    from spectral_plasticity import experiment

    methods = FLAGS.methods or list(experiment.load_config("permuted_mnist", "paper").methods)
    stress(methods, workdir)


if __name__ == "__main__":
    app.run(main)
