"""Live tracking: what TensorBoard's event files and Trackio's local store recorded equals the CSV log, a resumed
run continues the same run, --eval_tasks logs task accuracy during training, a missing tracker is one line."""

import argparse
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, pretrain_file, run_stage, write_jsonl
from trainer.tracking import tracker_names


def csv_rows(directory):
    with open(directory / "output/pretrain_dense/pretrain_64_log.csv") as f:
        return list(csv.DictReader(f))


def prepare(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    # A small arithmetic task for --eval_tasks, where tasks/tinymind_arithmetic.yaml reads it.
    write_jsonl(tmp_path / "data/tasks/tinymind_arithmetic.jsonl",
                [{"question": f"{a} + {b} =", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1)]])


FLAGS = [*TINY, "--max_steps", 6, "--log_interval", 2, "--save_interval", 3, "--eval_interval", 3,
         "--val_data", "data/pretrain.jsonl", "--eval_tasks", "tinymind_arithmetic"]


READ_TRACKIO = """
import json
from trackio import SQLiteStorage
[run] = SQLiteStorage.get_runs("tinymind")
print(json.dumps([run, SQLiteStorage.get_logs("tinymind", run)], default=str))
"""


def test_tensorboard_and_trackio_record_every_csv_row_and_a_resumed_run_continues_its_own(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pytest.importorskip("trackio")
    prepare(tmp_path)
    env = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    run_stage("1-pretrain.py", *FLAGS, "--report_to", "tensorboard,trackio", cwd=tmp_path, env=env)
    run_dir = tmp_path / "output/pretrain_dense"
    (run_dir / "pretrain_64_resume_00000006.pt").unlink()  # back to step 3: steps 4-6 run again
    run_stage("1-pretrain.py", *FLAGS, "--report_to", "tensorboard,trackio", "--resume", cwd=tmp_path, env=env)
    rows = csv_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [0, 2, 3, 4, 6]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for column in ("loss", "lr", "val_bits_per_byte", "val_tinymind_arithmetic"):
        logged = [(int(row["step"]), float(row[column])) for row in rows if row[column]]
        recorded = [(event.step, event.value) for event in events.Scalars(column)]
        # Once each: the resumed run's steps replace the ones it repeats.
        assert [step for step, _ in recorded] == [step for step, _ in logged], column
        assert [value for _, value in recorded] == pytest.approx([value for _, value in logged], rel=1e-5), column
    assert "flags" in str(events.Tags()["tensors"])

    # Trackio reads TRACKIO_DIR when it is imported: read the store back in a process of its own.
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True)
    run, logs = json.loads(read.stdout)  # one run: the resumed run continued it
    assert run.startswith("pretrain_64-")
    last = {}
    for entry in logs:  # the resumed steps log again; the last value of each step is the run's
        last[entry["step"]] = entry
    assert sorted(last) == [int(row["step"]) for row in rows]
    for row in rows:
        for column in ("loss", "val_bits_per_byte"):
            if row[column]:
                assert last[int(row["step"])][column] == pytest.approx(float(row[column]), rel=1e-5)


def test_a_fresh_run_drops_the_tensorboard_events_a_dead_run_left_in_its_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prepare(tmp_path)
    run_stage("1-pretrain.py", *TINY, "--max_steps", 3, "--report_to", "tensorboard", cwd=tmp_path)
    run_dir = tmp_path / "output/pretrain_dense"
    for state in run_dir.glob("*_resume_*.pt"):  # as a run killed before its first save leaves its folder
        state.unlink()
    run_stage("1-pretrain.py", *TINY, "--max_steps", 2, "--report_to", "tensorboard", cwd=tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = [int(row["step"]) for row in csv_rows(tmp_path)]
    assert [event.step for event in events.Scalars("loss")] == logged == [1, 2]  # this run's steps, once each


def test_report_to_takes_none_or_trackers_separated_by_commas():
    assert tracker_names("none") == ()
    assert tracker_names("tensorboard, trackio,tensorboard") == ("tensorboard", "trackio")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown tracker 'mlflow': choose none or any of"):
        tracker_names("tensorboard,mlflow")


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_install(tmp_path):
    pytest.importorskip("trackio")
    prepare(tmp_path)
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = run_stage("1-pretrain.py", *TINY, "--max_steps", 1, "--report_to", "wandb", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --report_to wandb: its package is not installed; pip install wandb"
