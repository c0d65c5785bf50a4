"""The command line end to end: `cli sweep` twice (the second resumes and adds nothing), `cli
plots`, `cli list`, and the refusals of bad names — as `make sweep/plots/list` call it.

Slowly-changing regression needs no data; the overrides make it a few seconds of training.
"""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

OVERRIDES = ["stream.num_tasks=4", "stream.flip_after=40", "stream.eval_size=64",
             "tasks_per_chunk=2", "hessian.num_iters=10", "hessian.grid_size=100",
             "hessian.examples=64", "method_settings.l2=0.05"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectral_plasticity.cli", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    args = ["sweep", "--exp=slowly_changing_regression", f"--workdir={workdir}",
            "--methods=bp,l2", "--seeds=2", *(f"--override={o}" for o in OVERRIDES)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    tables = {m: pd.read_csv(workdir / "slowly_changing_regression-small" / m / "results.csv")
              for m in ("bp", "l2")}
    second = cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, tables


def test_sweep_writes_one_row_per_seed_and_task_and_resuming_adds_none(swept):
    workdir, tables = swept
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
    workdir, _ = swept
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
