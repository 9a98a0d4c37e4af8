"""The spread of a stage's held-out figures over runs that differ only in --seed: each run's first and last value of
every val_* column of its CSV log, then their mean and standard deviation (make demo-seeds).

    python -m scripts.seed_spread output/demo/grpo_dense output/demo/seed1/grpo_dense output/demo/seed2/grpo_dense
"""

import argparse
import statistics
from pathlib import Path

from scripts.report_card import progress


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each holds one *_log.csv)")
    args = parser.parse_args()
    figures = {}
    for run in args.runs:
        [log] = Path(run).glob("*_log.csv")
        for name, (before, after) in progress(log)[2].items():
            figures.setdefault(name, []).append((run, before, after))
    for name, rows in figures.items():
        print(f"held-out {name.replace('_', ' ')}: before → after")
        for run, before, after in rows:
            print(f"  {run}: {before:.3f} → {after:.3f} ({after - before:+.3f})")
        befores, afters = [b for _, b, _ in rows], [a for _, _, a in rows]
        gains = [a - b for _, b, a in rows]
        spread = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0  # noqa: E731
        print(f"  mean of {len(rows)}: {statistics.mean(befores):.3f} ± {spread(befores):.3f} → "
              f"{statistics.mean(afters):.3f} ± {spread(afters):.3f}; gain {statistics.mean(gains):+.3f} ± "
              f"{spread(gains):.3f} (± one standard deviation over the runs)")


if __name__ == "__main__":
    main()
