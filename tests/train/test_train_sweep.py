"""The sweep runner: exact resume after SIGKILL, corrupt checkpoints, changed configs,
divergence of one run, sharding over several devices, bad work directories, the work-dir lock
and the terminal."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import sweep_fixture

from spectral_plasticity.train import (
    ConfigChangedError,
    UnreadableCheckpointsError,
    WorkDirBusyError,
    hparam_grid,
    run_sweep,
    work_dir_lock,
)
from spectral_plasticity.train.results import load_arrays

ROOT = Path(__file__).parents[2]
FIXTURE = Path(__file__).parent / "sweep_fixture.py"


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _sweep(run_dir: Path, **kwargs) -> pd.DataFrame:
    return run_sweep(sweep_fixture.make_trainer(), seeds=[0, 1], hparams=[{"lr": 0.05}],
                     run_dir=run_dir, config={"name": "fixture"}, **kwargs)


def test_rows_follow_an_independent_computation(tmp_path):
    table = _sweep(tmp_path / "run")
    assert len(table) == 2 * 4 * 3
    assert list(table[table.seed == 0]["task"]) == list(range(12))
    # Re-run seed 1 alone, directly: its rows equal the vmapped sweep's.
    import jax

    trainer = sweep_fixture.make_trainer()
    hp = {"lr": np.float32(0.05)}
    state = trainer.init(jax.random.key(1), hp)
    losses = []
    for _ in range(trainer.num_chunks):
        state, metrics = trainer.run_chunk(state, hp)
        losses.extend(np.asarray(metrics["final_loss"]))
    np.testing.assert_allclose(table[table.seed == 1]["final_loss"], losses, rtol=1e-5)
    arrays = load_arrays(tmp_path / "run")
    assert arrays["loss_curve"].shape == (2, 12, sweep_fixture.STEPS)


def test_resume_is_bit_identical(tmp_path):
    whole = _sweep(tmp_path / "whole")
    first = _sweep(tmp_path / "split", max_chunks=2)
    assert len(first) == 2 * 2 * 3
    resumed = _sweep(tmp_path / "split")
    pd.testing.assert_frame_equal(whole, resumed, check_exact=True)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = [sys.executable, str(FIXTURE)]
    proc = subprocess.Popen([*args, str(killed), "0,1,2", "0.05,0.1", "0.4"], env=_env())
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [p for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() \
            else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(killed / "results.csv")
    assert 0 < len(partial) < 6 * 6 * 3
    subprocess.run([*args, str(killed), "0,1,2", "0.05,0.1"], env=_env(), check=True)
    subprocess.run([*args, str(whole), "0,1,2", "0.05,0.1"], env=_env(), check=True)
    resumed, uninterrupted = (pd.read_csv(d / "results.csv") for d in (killed, whole))
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
    assert not resumed.duplicated(["run", "task"]).any()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    run_dir = tmp_path / "run"
    _sweep(run_dir, max_chunks=3)
    latest = run_dir / "checkpoints" / "3"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    resumed = _sweep(run_dir)
    assert "checkpoint 3" in caplog.text and "unreadable" in caplog.text
    pd.testing.assert_frame_equal(resumed, _sweep(tmp_path / "whole"), check_exact=True)


def test_changed_config_is_refused_and_nothing_is_lost(tmp_path):
    run_dir = tmp_path / "run"
    _sweep(run_dir, max_chunks=1)
    before = (run_dir / "results.csv").read_bytes()
    with pytest.raises(ConfigChangedError, match="name: 'fixture' -> 'other'"):
        run_sweep(sweep_fixture.make_trainer(), seeds=[0, 1], hparams=[{"lr": 0.05}],
                  run_dir=run_dir, config={"name": "other"})
    assert (run_dir / "results.csv").read_bytes() == before


def test_a_diverging_run_is_marked_and_the_others_go_on(tmp_path, caplog):
    table = run_sweep(sweep_fixture.make_trainer(), seeds=[0], hparams=hparam_grid(
        {"lr": [0.05, 50.0]}), run_dir=tmp_path / "run", config={})
    bad, good = table[table.lr == 50.0], table[table.lr == 0.05]
    assert bad["diverged"].iloc[-1] and not good["diverged"].any()
    assert np.isfinite(good["final_loss"]).all()
    assert "diverged" in caplog.text


def test_sharded_over_four_devices_equals_one_device(tmp_path):
    for devices in (1, 4):
        subprocess.run([sys.executable, str(FIXTURE), str(tmp_path / f"d{devices}"), "0,1,2",
                        "0.05", "0"], env=_env(devices), check=True)
    one, four = (pd.read_csv(tmp_path / f"d{d}" / "results.csv") for d in (1, 4))
    pd.testing.assert_frame_equal(one, four, check_exact=False, rtol=1e-6)
    summary = (tmp_path / "d4" / "summary.json").read_text()
    assert '"devices": 4' in summary


def test_unwritable_work_directory_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write to the work directory .*: a part of its path "
                                      "is a file"):
        _sweep(blocker / "run")
    with pytest.raises(OSError, match="cannot use the work directory .*: it is a file"):
        _sweep(blocker)


def test_hparam_grid_and_bad_sweeps():
    assert hparam_grid({"lr": [1, 2], "l2": [3]}) == [{"lr": 1, "l2": 3}, {"lr": 2, "l2": 3}]
    with pytest.raises(ValueError, match=r"sweep\.lr must be a non-empty list"):
        hparam_grid({"lr": []})
    with pytest.raises(ValueError, match="same keys"):
        run_sweep(sweep_fixture.make_trainer(), seeds=[0], hparams=[{"lr": 1.0}, {"l2": 1.0}],
                  run_dir="unused", config={})


def test_a_failing_write_keeps_the_saved_work(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _sweep(run_dir, max_chunks=2)
    before = (run_dir / "results.csv").read_bytes()

    def disk_full(self, rows):
        raise OSError(28, "No space left on device")

    from spectral_plasticity.train import results

    monkeypatch.setattr(results.ResultsTable, "append", disk_full)
    with pytest.raises(OSError, match="checkpoint of chunk 2 and the rows before it are intact"):
        _sweep(run_dir)
    monkeypatch.undo()
    assert (run_dir / "results.csv").read_bytes() == before
    pd.testing.assert_frame_equal(_sweep(run_dir), _sweep(tmp_path / "whole"), check_exact=True)


def test_a_second_sweep_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with work_dir_lock(run_dir), pytest.raises(WorkDirBusyError,
                                               match=f"in use by process {os.getpid()} "):
        _sweep(run_dir)
    assert not (run_dir / "results.csv").exists()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spectral_plasticity.train.lock import "
         "work_dir_lock\nwith work_dir_lock(sys.argv[1]):\n print('held', flush=True); "
         "time.sleep(600)", str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkDirBusyError, match=f"process {holder.pid} "):
        _sweep(run_dir)
    holder.kill()
    holder.wait()
    assert f'"pid": {holder.pid}' in (run_dir / ".lock").read_text()  # stale record left
    pd.testing.assert_frame_equal(_sweep(run_dir), _sweep(tmp_path / "whole"), check_exact=True)


@pytest.mark.slow  # the lock itself: test_the_lock_of_a_killed_process_is_taken_over
def test_two_sweeps_on_one_directory_lose_and_duplicate_no_row(tmp_path):
    """The issue's scenario: the same command started again once checkpoint 2 exists."""
    shared, whole = tmp_path / "shared", tmp_path / "whole"
    # 2 s per chunk: the 4 chunks after checkpoint 2 outlast the second's start on a loaded CPU
    args = [sys.executable, str(FIXTURE), str(shared), "0,1", "0.05", "2.0"]
    first = subprocess.Popen(args, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (shared / "checkpoints" / "2").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(args, env=_env(), capture_output=True, text=True)
    assert first.wait() == 0
    assert second.returncode != 0
    assert f"is in use by process {first.pid}" in second.stderr
    subprocess.run([*args[:-1], "0"], env=_env(), check=True, cwd=tmp_path)
    subprocess.run([sys.executable, str(FIXTURE), str(whole), "0,1", "0.05"], env=_env(),
                   check=True)
    shared_rows, whole_rows = (pd.read_csv(d / "results.csv") for d in (shared, whole))
    assert not shared_rows.duplicated(["run", "task"]).any()
    pd.testing.assert_frame_equal(shared_rows, whole_rows, check_exact=True)


def _corrupt_every_checkpoint(run_dir):
    for f in (run_dir / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_all_checkpoints_corrupt_is_refused_until_restart_and_keeps_the_rows(tmp_path):
    run_dir = tmp_path / "run"
    _sweep(run_dir, max_chunks=3)
    before = (run_dir / "results.csv").read_bytes()
    _corrupt_every_checkpoint(run_dir)
    for _ in range(2):  # refused again once the unreadable checkpoints were moved aside
        with pytest.raises(UnreadableCheckpointsError,
                           match=r"holds 18 result rows but no readable checkpoint.*--restart"):
            _sweep(run_dir)
        assert (run_dir / "results.csv").read_bytes() == before
    restarted = _sweep(run_dir, restart=True)
    pd.testing.assert_frame_equal(restarted, _sweep(tmp_path / "whole"), check_exact=True)
    (kept,) = run_dir.glob("results.csv.replaced_*")
    assert kept.read_bytes() == before


def test_summary_records_the_swept_names_and_the_extra_record(tmp_path):
    run_sweep(sweep_fixture.make_trainer(num_chunks=1), seeds=[0], hparams=hparam_grid(
        {"lr": [0.05, 0.1]}), run_dir=tmp_path / "run", config={},
        record={"data": {"source": "generated"}})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["swept"] == ["lr"]
    assert summary["data"] == {"source": "generated"}
    assert [r["lr"] for r in summary["runs"]] == [0.05, 0.1]


@pytest.mark.parametrize(("error", "reason"), [
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
])
def test_an_unwritable_work_directory_is_one_clear_line(tmp_path, monkeypatch, error, reason):
    def fail(self, data):
        raise error

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(OSError) as raised:
        _sweep(tmp_path / "run")
    message = str(raised.value)
    assert f"cannot write to the work directory {tmp_path / 'run'}: {reason}" in message
    assert "\n" not in message


def test_terminal_lines_and_a_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    _sweep(tmp_path / "plain", label="fixture")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert "fixture: 2 seeds x 1 settings, chunks 0/4 done ->" in lines[0]
    assert "fixture: finished at chunk 4/4 in" in lines[1]
    assert lines[1].endswith(str(tmp_path / "plain" / "results.csv"))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _sweep(tmp_path / "tty", label="fixture")
    shown = terminal.getvalue()
    assert "\rfixture:" in shown and "/12.0 [" in shown and "tasks/s" in shown
