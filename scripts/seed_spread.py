"""The spread of a stage's held-out figures over runs that differ only in --seed: each run's first and last value of
every val_* column of its CSV log, then their mean and standard deviation (make demo-seeds). With --tool_task, each
run's final weights are also scored on the report card's calculator task with the calculator offered and run.

    python -m scripts.seed_spread output/demo/grpo_dense output/demo/seed1/grpo_dense output/demo/seed2/grpo_dense
"""

import argparse
import statistics
from pathlib import Path

from scripts.report_card import TOOL_TASKS, progress, runs, task_scores
from trainer.loading import load_for_use
from trainer.tools import load_tools


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary(name, rows):
    """Each run's (before, after) and their mean ± one standard deviation, before, after and of the change."""
    lines = [f"held-out {name}: before → after"]
    lines += [f"  {run}: {before:.3f} → {after:.3f} ({after - before:+.3f})" for run, before, after in rows]
    befores, afters = [b for _, b, _ in rows], [a for _, _, a in rows]
    gains = [a - b for _, b, a in rows]
    lines.append(f"  mean of {len(rows)}: {statistics.mean(befores):.3f} ± {spread(befores):.3f} → "
                 f"{statistics.mean(afters):.3f} ± {spread(afters):.3f}; change {statistics.mean(gains):+.3f} ± "
                 f"{spread(gains):.3f} (± one standard deviation over the runs)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each holds one *_log.csv, beside its weights for --tool_task)")
    parser.add_argument("--tool_task", help="the weights every run started from: score it and each run's final "
                                            "weights on the calculator task with the calculator")
    parser.add_argument("--limit", type=int, default=100, help="calculator questions scored (--tool_task)")
    args = parser.parse_args()
    figures, start = {}, None
    calculator = load_tools("calculator") if args.tool_task else None
    score = lambda path: task_scores(*load_for_use(path), TOOL_TASKS, True, calculator, args.limit, 42)  # noqa: E731
    for run in args.runs:
        found = runs(run) if args.tool_task else [(None, log, None) for log in Path(run).glob("*_log.csv")]
        if len(found) != 1:
            raise SystemExit(f"seed_spread: {run} holds {len(found)} runs (a *_log.csv"
                             f"{' beside its weights' if args.tool_task else ''}); give one run's folder")
        [(_, log, weights)] = found
        for name, (before, after) in progress(log)[2].items():
            figures.setdefault(name.replace("_", " "), []).append((run, before, after))
        if args.tool_task:
            start = score(args.tool_task)[TOOL_TASKS[0]][0] if start is None else start
            after = score(weights)[TOOL_TASKS[0]][0]
            figures.setdefault(f"{TOOL_TASKS[0]} with the calculator", []).append((run, start, after))
    for name, rows in figures.items():
        print(summary(name, rows))


if __name__ == "__main__":
    main()
