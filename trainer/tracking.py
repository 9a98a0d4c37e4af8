"""Live run tracking: `--report_to tensorboard|wandb|swanlab|trackio` (or several, comma-separated) mirrors every
row of the run's CSV (the held-out figures included) to each tracker as it is written.

Only the main process reports. A run keeps one id from its first step to its last, across `--resume` (the id is
part of the resume state), so a resumed run continues its own curves: TensorBoard drops the events logged after
the step it resumes from, the others resume the run of that id. Offline by default where a tracker has an
offline mode: wandb writes under the run folder unless WANDB_MODE says otherwise, SwanLab logs locally unless
SWANLAB_MODE does; TensorBoard writes `tensorboard/` in the run folder; Trackio writes its local store
($TRACKIO_DIR, by default ~/.cache/huggingface/trackio; `trackio show` opens it).
"""

import argparse
import importlib
import os
import shutil

from .errors import UserError

PROJECT = "tinymind"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "trackio": "trackio"}
TENSORBOARD_DIR = "tensorboard"  # in the run folder


def tracker_names(value):
    """--report_to's value: "none", or tracker names separated by commas."""
    names = [name.strip() for name in value.split(",") if name.strip() not in ("", "none")]
    for name in names:
        if name not in TRACKERS:
            raise argparse.ArgumentTypeError(f"unknown tracker {name!r}: choose none or any of {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


def open_tracker(names, run_dir, run_name, run_id, config, step):
    """The trackers `names` for this run as one (None when there are none), resumed at `step` when that is past
    0."""
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise UserError(f"--report_to {name}: its package is not installed; pip install {PACKAGES[name]}") from None
    return Trackers([TRACKERS[name](run_dir, run_name, run_id, config, step) for name in names]) if names else None


def clear_local_output(run_dir):
    """A fresh run's start: the TensorBoard events an earlier run left in its folder are removed, as its CSV log is.
    TensorBoard draws every event file of the folder as one run, so a dead run's steps would show as this run's
    twice over. wandb, SwanLab and Trackio keep each run under its own id: an earlier run stays a run of its own
    there (an offline one can still be synced), and this run's curves are its own."""
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)


class Trackers:
    def __init__(self, trackers):
        self.trackers = trackers

    def log(self, row, step):
        for tracker in self.trackers:
            tracker.log(row, step)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def numbers(row):
    return {key: float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}


class TensorBoard:
    def __init__(self, run_dir, run_name, run_id, config, step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a crashed run logged after the step it resumes from are dropped.
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("flags", "\n".join(f"    {key}: {value}" for key, value in sorted(config.items())))

    def log(self, row, step):
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Wandb:
    def __init__(self, run_dir, run_name, run_id, config, step):
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row, step):
        self.run.log(numbers(row), step=step)

    def close(self):
        self.run.finish()


class SwanLab:
    def __init__(self, run_dir, run_name, run_id, config, step):
        import swanlab

        self.swanlab = swanlab
        swanlab.init(project=PROJECT, experiment_name=run_name, id=run_id, resume="allow", config=config,
                     logdir=str(run_dir / "swanlog"), mode=os.environ.get("SWANLAB_MODE", "local"))

    def log(self, row, step):
        self.swanlab.log(numbers(row), step=step)

    def close(self):
        self.swanlab.finish()


class Trackio:
    def __init__(self, run_dir, run_name, run_id, config, step):
        import trackio

        self.trackio = trackio
        # A Trackio run is found by its name within the project: the id makes it this run's alone.
        trackio.init(project=PROJECT, name=f"{run_name}-{run_id}", config=config, resume="allow", embed=False)

    def log(self, row, step):
        self.trackio.log(numbers(row), step=step)

    def close(self):
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "swanlab": SwanLab, "trackio": Trackio}
