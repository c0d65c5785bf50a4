"""The command line end to end: `make sweep` twice (the second resumes and adds nothing; its
output to a file is a few lines), `cli plots`, `cli list`, the refusals of bad names, and make
passing on a SIGTERM's 143.

Slowly-changing regression needs no data; the overrides make it a few seconds of training.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

OVERRIDES = ["stream.num_tasks=4", "stream.flip_after=40", "stream.eval_size=64",
             "tasks_per_chunk=2", "hessian.num_iters=10", "hessian.grid_size=100",
             "hessian.examples=64", "method_settings.l2=0.05"]


ROOT = Path(__file__).parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectral_plasticity.cli", *args],
                          capture_output=True, text=True, timeout=600)


def make(target: str, *variables: str, python: str = sys.executable, **kwargs
         ) -> subprocess.CompletedProcess:
    """``make TARGET`` of the project's Makefile with this interpreter (no venv set-up)."""
    stamp = Path(tempfile.mkdtemp()) / "installed"
    stamp.touch()  # newer than pyproject.toml: make installs nothing
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"PY={python}",
                           f"STAMP={stamp}", *variables], env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    args = ["EXP=slowly_changing_regression", f"WORKDIR={workdir}", "METHODS=bp,l2", "SEEDS=2",
            f"OVERRIDES={' '.join(OVERRIDES)}"]
    with open(workdir / "first.log", "w") as log:
        first = make("sweep", *args, stdout=log, stderr=subprocess.STDOUT)
    output = (workdir / "first.log").read_text()
    assert first.returncode == 0, output[-3000:]
    tables = {m: pd.read_csv(workdir / "slowly_changing_regression-small" / m / "results.csv")
              for m in ("bp", "l2")}
    second = make("sweep", *args, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, tables, output


def test_make_sweep_to_a_file_prints_one_line_per_method_start_and_end(swept):
    _, _, output = swept
    lines = output.splitlines()
    assert len(lines) == 4, output[-3000:]
    assert [line.split(": ", 1)[1].split(",")[0].split(" at ")[0] for line in lines] == [
        "2 seeds x 1 settings", "finished", "2 seeds x 1 settings", "finished"]
    assert lines[1].endswith("slowly_changing_regression-small/bp/results.csv")


@pytest.mark.slow  # one more CLI process for a logging switch
def test_verbosity_brings_the_library_logs_back(tmp_path):
    args = ["sweep", "--exp=slowly_changing_regression", f"--workdir={tmp_path}",
            "--methods=bp", "--seeds=1", "--max_chunks=1",
            *(f"--override={o}" for o in OVERRIDES)]
    loud = cli(*args, "--verbosity=0")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "checkpoint_manager.py" in loud.stderr  # orbax's INFO lines


def test_make_passes_on_a_sigterm_as_143(tmp_path):
    stopped = tmp_path / "stopped.sh"
    stopped.write_text("#!/bin/sh\nexit 143\n")  # what the CLI returns after a SIGTERM
    stopped.chmod(0o755)
    done = make("sweep", python=str(stopped), capture_output=True, text=True)
    assert done.returncode in (143, -15), done.stderr


def test_sweep_writes_one_row_per_seed_and_task_and_resuming_adds_none(swept):
    workdir, tables, _ = swept
    for method, table in tables.items():
        assert sorted(zip(table["seed"], table["task"], strict=True)) == [
            (s, t) for s in (0, 1) for t in range(4)], method
        assert np.isfinite(table["eval_loss"]).all() and not table["diverged"].any()
        # The Hessian is measured at the first task of each chunk (tasks 0 and 2) only.
        measured = table.loc[np.isfinite(table["epsilon_rank_init"]), "task"]
        assert sorted(set(measured)) == [0, 2]
        again = pd.read_csv(workdir / "slowly_changing_regression-small" / method /
                            "results.csv")
        pd.testing.assert_frame_equal(again, table)
    # Same seeds and data: the L2 runs end with smaller weights than plain backprop.
    last = lambda t: t[t["task"] == 3].sort_values("seed")["weight_norm"].to_numpy()
    assert np.all(last(tables["l2"]) < last(tables["bp"]))


def test_plots_are_written_from_the_results(swept):
    workdir, _, _ = swept
    result = cli("plots", "--exp=slowly_changing_regression", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = {line.rsplit("/", 1)[-1] for line in result.stdout.split()}
    assert {"performance.png", "epsilon_rank.png"} <= written
    for name in written:
        png = workdir / "slowly_changing_regression-small" / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list_and_bad_names_are_clear():
    listed = cli("list")
    assert listed.returncode == 0 and "slowly_changing_regression" in listed.stdout
    unknown = cli("sweep", "--exp=no_such_experiment")
    assert unknown.returncode != 0
    assert "unknown experiment 'no_such_experiment'; choose one of" in unknown.stderr
    bad_key = cli("sweep", "--exp=slowly_changing_regression", "--override=stream.flip=3")
    assert bad_key.returncode != 0 and "unknown config key 'stream.flip'" in bad_key.stderr
    bad_method = cli("sweep", "--exp=slowly_changing_regression", "--methods=bp,l3")
    assert bad_method.returncode != 0 and "l3" in bad_method.stderr
