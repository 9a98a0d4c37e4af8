"""Turn a run's CSV log into a PNG: loss/CE/aux and learning rate against tokens, and MoE expert load shares.

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
    load_columns = [c for c in log.columns if c.startswith("load_l")]
    layers = sorted({c.split("_")[1] for c in load_columns}, key=lambda name: int(name[1:]))
    fig, axes = plt.subplots(2 + len(layers), 1, figsize=(9, 5 + 2.2 * len(layers)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    tokens = log["tokens"] / 1e6

    for column in ("loss", "ce", "aux"):
        axes[0].plot(tokens, log[column], label=column)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].set_title(title)
    axes[1].plot(tokens, log["lr"], color="tab:gray")
    axes[1].set_ylabel("learning rate")

    for ax, layer in zip(axes[2:], layers):
        experts = [c for c in load_columns if c.split("_")[1] == layer]
        ax.stackplot(tokens, *(log[c] for c in experts), labels=[c.split("_")[2] for c in experts])
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"layer {layer[1:]} load")
        ax.legend(loc="upper right", ncol=len(experts), fontsize="small")
    axes[-1].set_xlabel("tokens (millions)")
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
    missing = {"tokens", "loss", "ce", "aux", "lr"} - set(log.columns)
    if missing:
        sys.exit(f"error: {path}: not a tinymind run log, it lacks the columns {sorted(missing)}")
    out = Path(args.out) if args.out else path.with_suffix(".png")
    plot(log, out, path.stem)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
