"""The run's CSV log, the MoE expert-load watch that warns while an expert collapses, and peak memory."""

import csv
import resource
from pathlib import Path

import torch

from model import atomic_write

from .errors import UserError


def log_columns(objective, expert_loads, held_out, eval_tasks=()):
    """The CSV header: progress (training seconds exclude evaluation), the loss and the objective's metrics, the
    held-out figures when there is validation data and the --eval_tasks accuracies (filled on the rows where they
    were evaluated), the optimizer, then MoE expert loads."""
    loads = [f"load_l{layer}_e{expert}" for layer in range(len(expert_loads.layers))
             for expert in range(expert_loads.n_experts)]
    validation = [held_out_column(name) for name in objective.held_out] if held_out else []
    validation += [held_out_column(task) for task in eval_tasks]
    return ["step", "tokens", "seconds", "loss", *objective.metrics, *validation, "lr", "grad_norm", "tokens_per_s",
            *loads]


def held_out_column(name):
    """"bits per byte" → "val_bits_per_byte"."""
    return "val_" + name.replace(" ", "_").replace("-", "_")


def column_flag(column):
    """The flag whose giving or dropping adds or removes a log column a resumed run may differ in (None: another)."""
    return "--val_data" if column.startswith("val_") else "--z_loss" if column == "z" else None


class CsvLog:
    """Appends one row per log interval; `truncate(rows)` drops rows written after a resumed checkpoint."""

    def __init__(self, path, columns):
        self.path = Path(path)
        self.columns = columns

    def rows(self) -> int:
        if not self.path.is_file():
            return 0
        with open(self.path, newline="") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)

    def check_continues(self):
        """A resumed run appends under the header of the log it continues: one logging other columns (--z_loss or
        --val_data given or dropped) would write its rows under the wrong ones, so it is refused in one line naming
        the columns, before the log is touched."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is None or header == self.columns:
            return
        added = [column for column in self.columns if column not in header]
        dropped = [column for column in header if column not in self.columns]
        changes = [f"{what} {', '.join(columns)}" for what, columns in (("adds", added), ("drops", dropped)) if columns]
        changed = "; ".join(changes) or "the same ones in another order"
        flags = " and ".join(dict.fromkeys(filter(None, map(column_flag, added + dropped)))) or "flags"
        raise UserError(f"--resume: this run logs other columns than {self.path} holds ({changed}); resume with the "
                        f"{flags} the run began with, or start a new run without --resume")

    def truncate(self, rows):
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            kept = list(csv.reader(f))[: rows + 1]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)

        atomic_write(self.path, write)

    def append(self, row):
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow(row)


class ExpertLoadWatch:
    """Averages each MoE layer's expert shares over a log interval and flags experts starving throughout a
    window of at least MIN_STEPS optimizer steps (one log interval or several: an expert starved for a step or
    two, as at `--log_interval 1` early in a run, is no evidence).

    An expert is collapsing when its share of assignments stays below a quarter of the fair
    share 1/E at every step of the window.
    """

    MIN_STEPS = 10

    def __init__(self, moe_layers):
        self.layers = moe_layers
        self.n_experts = moe_layers[0].n_experts if moe_layers else 0
        self.threshold = 0.25 / self.n_experts if self.n_experts else 0.0
        self.reset()
        self.window_max, self.window_steps = None, 0

    def reset(self):
        self.sum = None
        self.steps = 0

    def observe(self, step_load):
        """step_load: [layers, experts] mean shares of one optimizer step."""
        self.sum = step_load if self.sum is None else self.sum + step_load
        self.steps += 1
        self.window_max = step_load if self.window_max is None else torch.maximum(self.window_max, step_load)
        self.window_steps += 1

    def take_counts(self, device):
        """[layers, experts] assignments counted by the training forwards since the last call (empty for a
        dense model), zeroing the layers' counters."""
        if not self.layers:
            return torch.zeros(0, 0, device=device)
        counts = torch.stack([layer.expert_counts.clone() for layer in self.layers])
        for layer in self.layers:
            layer.expert_counts.zero_()
        return counts

    def summary(self):
        """(columns → mean share, warnings) for the interval, then starts a new interval; the warnings judge the
        window once it holds MIN_STEPS steps, and start a new one."""
        if not self.layers or self.sum is None:
            return {}, []
        mean, most = torch.stack([self.sum / self.steps, self.window_max]).cpu()  # one read of the device per log row
        shares = {
            f"load_l{layer}_e{expert}": round(mean[layer, expert].item(), 4)
            for layer in range(mean.shape[0]) for expert in range(mean.shape[1])
        }
        warnings = []
        if self.window_steps >= self.MIN_STEPS:
            warnings = [
                f"expert {expert} of MoE layer {layer} got under {self.threshold:.3f} of the tokens at every step "
                f"of the last {self.window_steps} (max {most[layer, expert].item():.3f}): it is collapsing; "
                "raise --aux_loss_alpha or lower --learning_rate"
                for layer, expert in (most < self.threshold).nonzero().tolist()
            ]
            self.window_max, self.window_steps = None, 0
        self.reset()
        return shares, warnings


def peak_memory_bytes(device):
    """CUDA: the most memory tensors held on the device; CPU: the process's resident-set high-water mark
    (weights, gradients, optimizer state, activations, and the data and libraries around them)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
