"""Turn a run's CSV log into a PNG: the loss, each of the objective's metrics (CE and aux; DPO's reward accuracy;
GRPO's reward, ...), the held-out figures of `--eval_interval` (val_*: bits per byte, ...) and the learning rate
against the step, and MoE expert load shares.

    python -m scripts.plot_logs output/pretrain_moe/pretrain_512_moe_log.csv   # writes ..._log.png beside it
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
import pandas as pd


def plot(log: pd.DataFrame, out: Path, title: str):
    columns = list(log.columns)
    metrics = columns[columns.index("loss"):columns.index("lr")]  # the loss, then the objective's metrics
    load_columns = [c for c in columns if c.startswith("load_l")]
    layers = sorted({c.split("_")[1] for c in load_columns}, key=lambda name: int(name[1:]))
    rows = len(metrics) + 1 + len(layers)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 1.8 * rows + 1), sharex=True, squeeze=False)
    axes = axes[:, 0]
    steps = log["step"]
    window = max(1, len(log) // 10)  # a rolling mean over a tenth of the run shows the trend under step noise
    for ax, column in zip(axes, metrics):
        if column.startswith("val_"):  # held-out figures: only the rows where they were evaluated
            evaluated = log[column].notna()
            ax.plot(steps[evaluated], log[column][evaluated], marker="o", color="tab:orange")
        else:
            ax.plot(steps, log[column], alpha=0.35 if window > 1 else 1.0)
            if window > 1:
                ax.plot(steps, log[column].rolling(window, min_periods=1).mean(), color="tab:blue")
        ax.set_ylabel(column)
    axes[0].set_title(title)
    axes[len(metrics)].plot(steps, log["lr"], color="tab:gray")
    axes[len(metrics)].set_ylabel("learning rate")

    for ax, layer in zip(axes[len(metrics) + 1:], layers):
        experts = [c for c in load_columns if c.split("_")[1] == layer]
        ax.stackplot(steps, *(log[c] for c in experts), labels=[c.split("_")[2] for c in experts])
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"layer {layer[1:]} load")
        ax.legend(loc="upper right", ncol=len(experts), fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a run's *_log.csv")
    parser.add_argument("--out", help="PNG path (default: the CSV's path with .png)")
    args = parser.parse_args()
    path = Path(args.log)
    try:
        log = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError) as err:
        sys.exit(f"error: {path}: {err}")
    missing = {"step", "loss", "lr"} - set(log.columns)
    if missing:
        sys.exit(f"error: {path}: not a tinymind run log, it lacks the columns {sorted(missing)}")
    out = Path(args.out) if args.out else path.with_suffix(".png")
    plot(log, out, path.stem)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
