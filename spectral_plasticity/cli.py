"""Command line behind ``make sweep``, ``make list`` and ``make plots``.

    python -m spectral_plasticity.cli sweep --exp=slippery_ant [--scale=paper] [--seeds=5]
        [--methods=bp,l2_er] [--workdir=workdirs] [--override=ppo.learning_rate=3e-4 ...]
        [--restart] [--verbosity=0]
    python -m spectral_plasticity.cli list
    python -m spectral_plasticity.cli plots --exp=slippery_ant [--workdir=workdirs]

A sweep's results go to ``<workdir>/<experiment>-<scale>/<method>/``; running the same command
again resumes it. The terminal shows one line per method when it starts and ends and a progress
bar (on a terminal only); the libraries' INFO logs (orbax writes a dozen per checkpoint) are off
unless ``--verbosity=0`` (``-v 0``) asks for them.
"""

from __future__ import annotations

import logging as python_logging
import sys

from absl import app, flags, logging

from spectral_plasticity import experiment, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("exp", None, "Experiment name (a file in experiments/).")
flags.DEFINE_enum("scale", "small", list(experiment.SCALES), "small (CPU default) or paper.")
flags.DEFINE_integer("seeds", None, "Seeds per method and setting (overrides config.seeds).")
flags.DEFINE_list("methods", None, "Methods to run (overrides config.methods).")
flags.DEFINE_string("workdir", "workdirs", "Where runs are written.")
flags.DEFINE_multi_string("override", [], "Config overrides, key=value (nested: a.b=value).")
flags.DEFINE_integer("max_chunks", None, "Stop each run after this many chunks (resumable).")
flags.DEFINE_bool("restart", False, "Start a method over when its results have no readable "
                  "checkpoint (the old results.csv is kept aside); otherwise that is refused.")

COMMANDS = ("sweep", "list", "plots")


def quiet_libraries() -> None:
    """Warnings and errors only, unless ``--verbosity``/``-v`` was given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        for name in ("jax", "orbax", "absl"):
            python_logging.getLogger(name).setLevel(python_logging.WARNING)


def _sweep(config, workdir) -> None:
    from spectral_plasticity.train import (
        UnreadableCheckpointsError,
        WorkDirBusyError,
    )

    try:
        experiment.train_and_evaluate(config, workdir, methods=FLAGS.methods,
                                      max_chunks=FLAGS.max_chunks, restart=FLAGS.restart)
    except (ValueError, OSError, WorkDirBusyError, UnreadableCheckpointsError) as error:
        sys.exit(f"error: {error}")


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) > 1 else "sweep"
    if command not in COMMANDS or len(argv) > 2:
        raise app.UsageError(f"usage: cli [{'|'.join(COMMANDS)}] --exp=NAME ...; got {argv[1:]}")
    if command == "list":
        for name in experiment.available_experiments():
            config = experiment.load_config(name)
            print(f"{name:32s} trainer={config.trainer:10s} methods={','.join(config.methods)}")
        return
    if not FLAGS.exp:
        raise app.UsageError(
            f"--exp is required; experiments: {experiment.available_experiments()}"
        )
    try:
        config = experiment.load_config(FLAGS.exp, FLAGS.scale)
        if FLAGS.seeds is not None:
            config.seeds = FLAGS.seeds
        for assignment in FLAGS.override:
            experiment.apply_override(config, assignment)
    except ValueError as error:
        sys.exit(f"error: {error}")
    workdir = experiment.run_dir(FLAGS.workdir, FLAGS.exp, FLAGS.scale)
    if command == "plots":
        from spectral_plasticity import plots

        for path in plots.plot_experiment(workdir, config):
            print(path)
        return
    quiet_libraries()
    _sweep(config, workdir)


def run() -> None:
    runtime.configure_runtime()
    app.run(main)


if __name__ == "__main__":
    run()
