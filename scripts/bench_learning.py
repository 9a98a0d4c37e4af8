"""The learning benchmark: pretraining recipes at an equal wall-time budget, one after another (and repeated), on
the project's training split, with held-out bits per byte over time on its validation split.

    python -m scripts.bench_learning                                # every recipe, 180 s each, twice
    python -m scripts.bench_learning --budget 60 --repeats 1 --recipes baseline muon

Each recipe first times a few steps to turn the budget into a step count (so its learning-rate schedule runs to
its end inside the budget), then trains 1-pretrain's model from scratch with `--val_data` evaluated
`--evaluations` times. Seconds are training time only (evaluation left out). Printed per recipe: steps, real
(non-padding) tokens, seconds, held-out bits per byte at the end, and the seconds at which it first reached the
baseline's final bits per byte; a PNG plots bits per byte against seconds.

`baseline` is the recipe 1-pretrain.py had before this benchmark (AdamW β2 0.95, lr 5e-4, 2% warmup then cosine,
length-grouped batches); `default` is its recipe now (Muon for the matrices in the blocks, lr 2e-3, warmup-stable-
decay). The `minimind` recipe emulates MiniMind's own training code: AdamW at lr 5e-4 with PyTorch's betas (0.9, 0.999)
and weight decay 0.01, cosine to lr/10 without warmup, and every row padded to the maximum length in batches
drawn at random (tinymind groups samples of similar length and pads each batch to its longest).
"""

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataset import PretrainDataset  # noqa: E402
from dataset.batch import collate  # noqa: E402
from trainer import Stage, run_cli, train_stage  # noqa: E402

MODEL = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--num_key_value_heads", "2",
         "--vocab_size", "6400", "--max_seq_len", "256", "--batch_size", "16"]
BASELINE = ["--optimizer", "adamw", "--learning_rate", "5e-4", "--schedule", "cosine"]  # the recipe before Muon
DEFAULT = ["--optimizer", "muon", "--learning_rate", "2e-3", "--schedule", "wsd"]  # 1-pretrain.py's defaults now
MOE = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2", "--n_shared_experts", "1"]
RECIPES = {
    "baseline": BASELINE,
    "minimind": [*BASELINE, "--adam_beta2", "0.999", "--weight_decay", "0.01", "--warmup_steps", "0"],
    "adamw_lr_2e-3": [*BASELINE, "--learning_rate", "2e-3"],
    "muon": [*BASELINE, "--optimizer", "muon", "--learning_rate", "2e-3"],
    "default": DEFAULT,  # muon + wsd
    "default_qk_norm": [*DEFAULT, "--qk_norm", "true"],
    "default_packed": [*DEFAULT, "--pack", "isolated"],
    "default_packed_shared": [*DEFAULT, "--pack", "shared"],
    "default_untied": [*DEFAULT, "--tie_word_embeddings", "false"],
    "default_z_loss": [*DEFAULT, "--z_loss", "1e-4"],
    "moe_baseline": [*BASELINE, *MOE],
    "moe_default": [*DEFAULT, *MOE],
}


class PaddedToMaximum(PretrainDataset):
    """MiniMind's batches: every row padded to the maximum length, samples in random order (all lengths look
    alike to the length grouping, which then leaves the seeded permutation as it is)."""

    @property
    def lengths(self):
        return [self.max_length] * len(self)

    def collate(self, samples):
        batch = collate(samples, self.pad_id)
        extra = self.max_length - 1 - batch.input_ids.shape[1]  # a sample's inputs are at most max_length - 1
        return replace(batch, input_ids=F.pad(batch.input_ids, (0, extra), value=self.pad_id),
                       targets=F.pad(batch.targets, (0, extra), value=self.pad_id),
                       loss_mask=F.pad(batch.loss_mask, (0, extra)), attention_mask=F.pad(batch.attention_mask, (0, extra)))


def stage_for(recipe):
    return Stage(name="pretrain", description="", dataset=PaddedToMaximum if recipe == "minimind" else PretrainDataset,
                 default_data="data/pretrain.jsonl", default_val="data/pretrain_val.jsonl", packs=True, z_loss=True)


def run_log(recipe, out_dir, *flags):
    """Train the recipe with `flags` into `out_dir`; its CSV log."""
    argv = [*MODEL, *RECIPES[recipe], *flags, "--save_interval", str(10**9), "--out_dir", str(out_dir)]
    train_stage(stage_for(recipe), argv)
    kind = "moe" if "moe" in RECIPES[recipe] else "dense"
    return pd.read_csv(Path(out_dir) / f"pretrain_{kind}" / f"pretrain_128{'_moe' * (kind == 'moe')}_log.csv")


def train(recipe, steps, args, out_dir):
    every = str(max(1, steps // args.evaluations))
    log = run_log(recipe, out_dir, "--data_path", args.data, "--val_data", args.val, "--val_samples",
                  str(args.val_samples), "--max_steps", str(steps), "--eval_interval", every, "--log_interval", every,
                  "--seed", str(args.seed), "--device", args.device)
    return log[log["val_bits_per_byte"].notna()][["step", "tokens", "seconds", "val_bits_per_byte"]]


def seconds_per_step(recipe, args, out_dir, steps=20):
    """Median step time of a short run of the recipe, its first steps left out as warm-up."""
    log = run_log(recipe, out_dir, "--data_path", args.data, "--max_steps", str(steps), "--log_interval", "1",
                  "--seed", str(args.seed), "--device", args.device)
    return statistics.median(log["seconds"].diff().dropna().iloc[5:])


def reached(curve, target):
    """The first training second at which the held-out bits per byte was at or below `target`."""
    hits = curve[curve["val_bits_per_byte"] <= target + 1e-9]
    return float(hits["seconds"].iloc[0]) if len(hits) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=180, help="training seconds per recipe")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the recipes, interleaved")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--evaluations", type=int, default=10, help="held-out evaluations per run")
    parser.add_argument("--val_samples", type=int, default=128)
    parser.add_argument("--data", default="data/pretrain.jsonl")
    parser.add_argument("--val", default="data/pretrain_val.jsonl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="docs/learning.png", help="the PNG of bits per byte against seconds")
    args = parser.parse_args(argv)
    for path in (args.data, args.val):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such file; run `python -m scripts.prepare_data` first")
    recipes = ["baseline", *[r for r in args.recipes if r != "baseline"]]
    curves = {recipe: [] for recipe in recipes}
    with tempfile.TemporaryDirectory() as scratch:
        # Each recipe's step count, from step times measured twice, interleaved: every round then runs the same
        # schedule, and a neighbour slowing the machine for a while skews no recipe alone.
        timings = {recipe: [] for recipe in recipes}
        for attempt in range(2):
            for recipe in recipes:
                timings[recipe].append(seconds_per_step(recipe, args, Path(scratch) / f"calibrate_{recipe}_{attempt}"))
        steps = {recipe: max(8, int(args.budget / statistics.median(times))) for recipe, times in timings.items()}
        print("steps per recipe:", steps, flush=True)
        for round_ in range(args.repeats):
            for recipe in recipes:
                started = time.perf_counter()
                curve = train(recipe, steps[recipe], args, Path(scratch) / f"{recipe}_{round_}")
                curves[recipe].append(curve)
                print(f"round {round_ + 1}, {recipe}: {steps[recipe]} steps, {curve['seconds'].iloc[-1]:.0f} s of "
                      f"training ({time.perf_counter() - started:.0f} s with evaluation), held-out bits per byte "
                      f"{curve['val_bits_per_byte'].iloc[-1]:.3f}", flush=True)
    report(curves, args)


def report(curves, args):
    """Medians over the rounds: the table (each MoE recipe against the MoE baseline when it ran), and the PNG."""
    def final(recipe, column):
        return statistics.median(float(curve[column].iloc[-1]) for curve in curves[recipe])

    def reference(recipe):
        return "moe_baseline" if recipe.startswith("moe") and "moe_baseline" in curves else "baseline"

    print(f"\n{args.budget:.0f} s budget, {args.repeats} round(s), medians; 'reach' is the training time to the final "
          "held-out bits per byte of the baseline (of moe_baseline for MoE recipes)")
    print("| recipe | steps | real tokens | seconds | held-out bits per byte | reach baseline | time vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for recipe, runs in curves.items():
        target, seconds = final(reference(recipe), "val_bits_per_byte"), final(reference(recipe), "seconds")
        times = [reached(curve, target) for curve in runs]
        reach = statistics.median(times) if all(t is not None for t in times) else None
        print(f"| {recipe} | {final(recipe, 'step'):.0f} | {final(recipe, 'tokens'):,.0f} | "
              f"{final(recipe, 'seconds'):.0f} | {final(recipe, 'val_bits_per_byte'):.3f} | "
              + (f"{reach:.0f} s | {reach / seconds:.2f}x |" if reach is not None else "not reached | |"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (recipe, runs), color in zip(curves.items(), plt.cm.tab10.colors):
        for index, curve in enumerate(runs):
            ax.plot(curve["seconds"], curve["val_bits_per_byte"], marker="o", markersize=3, color=color,
                    alpha=1.0 if index == 0 else 0.45, label=recipe if index == 0 else None)
    ax.set_xlabel("training seconds (this CPU)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"hidden 128 × 4 layers, batch 16 × 256, {args.budget:.0f} s per recipe")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
