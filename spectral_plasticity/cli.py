"""Command line behind ``make sweep``, ``make list`` and ``make plots``.

    python -m spectral_plasticity.cli sweep --exp=slippery_ant [--scale=paper] [--seeds=5]
        [--methods=bp,l2_er] [--workdir=workdirs] [--override=ppo.learning_rate=3e-4 ...]
    python -m spectral_plasticity.cli list
    python -m spectral_plasticity.cli plots --exp=slippery_ant [--workdir=workdirs]

A sweep's results go to ``<workdir>/<experiment>-<scale>/<method>/``; running the same command
again resumes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

COMMANDS = ("sweep", "list", "plots")


def run_dir_of(exp: str, scale: str, workdir: str) -> Path:
    return Path(workdir) / f"{exp}-{scale}"


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
    workdir = run_dir_of(FLAGS.exp, FLAGS.scale, FLAGS.workdir)
    if command == "plots":
        from spectral_plasticity import plots

        for path in plots.plot_experiment(workdir, config):
            print(path)
        return
    logging.info("experiment %s (%s scale) -> %s", FLAGS.exp, FLAGS.scale, workdir)
    try:
        experiment.train_and_evaluate(config, workdir, methods=FLAGS.methods,
                                      max_chunks=FLAGS.max_chunks)
    except ValueError as error:
        sys.exit(f"error: {error}")


def run() -> None:
    runtime.configure_runtime()
    app.run(main)


if __name__ == "__main__":
    run()
