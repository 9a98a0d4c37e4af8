"""The learning benchmark: pretraining recipes at an equal wall-time budget, one after another (and repeated), on
the project's training split, with held-out bits per byte over time on its validation split.

    python -m scripts.bench_learning                                # every recipe, 180 s each, twice
    python -m scripts.bench_learning --budget 60 --repeats 1 --recipes baseline muon
    python -m scripts.bench_learning --config configs/small.json --recipes muon_wsd default   # at a preset's shape

Each recipe first times a few steps to turn the budget into a step count (so its learning-rate schedule runs to
its end inside the budget), then trains 1-pretrain's model from scratch with `--val_data` evaluated
`--evaluations` times; a run that ends more than `--time_tolerance` (5%) away from its budget, since the
machine's speed drifts, is trained once more with the step time it measured. Seconds are training time only
(evaluation left out). Printed per recipe: steps, real (non-padding) tokens, seconds, held-out bits per byte at
the end, and the seconds at which it first reached the baseline's final bits per byte; a PNG plots bits per byte
against seconds.

`baseline` is the recipe 1-pretrain.py had before this benchmark (AdamW β2 0.95, lr 5e-4, 2% warmup then cosine,
length-grouped batches); `muon_wsd` the one after it (Muon for the matrices in the blocks, lr 2e-3, warmup-stable-
decay), which the `default_*` recipes vary; `default` is 1-pretrain.py as it runs now: its defaults
(trainer.PRETRAIN_DEFAULTS, `best` of those variations: rows packed best-fit at lr 6e-3 with an untied head and the
embedding at lr 0.1), and for a plan of at most 200 steps the bigram warm start first, its tables then at 3e-3 and
1e-3 (trainer.PRETRAIN_SHORT_PLAN; `warm_start` at any length, `best` always cold). The `minimind`
recipe emulates MiniMind's own training code: AdamW at lr 5e-4 with PyTorch's betas (0.9, 0.999)
and weight decay 0.01, cosine to lr/10 without warmup, and every row padded to the maximum length in batches
drawn at random (tinymind groups samples of similar length and pads each batch to its longest). The `nanochat`
recipe emulates nanochat's base_train in tinymind's flags (see NANOCHAT below); race the others to its final with
`--reference nanochat`, on your own corpus with a tokenizer fitted to it first (`--fit_tokenizer`):

    python -m scripts.bench_learning --data my/pretrain.jsonl --val my/pretrain_val.jsonl --fit_tokenizer \\
        --reference nanochat --recipes nanochat default default@50
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

from dataset import PretrainDataset, load_tokenizer  # noqa: E402
from dataset.batch import collate  # noqa: E402
from scripts.train_tokenizer import SHIPPED, SPLITS, fit, report_compression  # noqa: E402
from trainer import PRETRAIN_DEFAULTS, PRETRAIN_SHORT_PLAN, Stage, run_cli, train_stage  # noqa: E402
from trainer.flags import parse  # noqa: E402
from trainer.stages import stage_parser  # noqa: E402

MODEL = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--num_key_value_heads", "2",
         "--vocab_size", "6400", "--max_seq_len", "256", "--batch_size", "16"]
BASELINE = ["--optimizer", "adamw", "--learning_rate", "5e-4", "--schedule", "cosine"]  # the recipe before Muon
MUON_WSD = ["--optimizer", "muon", "--learning_rate", "2e-3", "--schedule", "wsd"]  # 1-pretrain.py's defaults before
MOE = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2", "--n_shared_experts", "1"]
# nanochat's base_train at this width, in tinymind's flags: Muon + AdamW, ReLU², QK-norm, an untied head, logit
# softcap 15, one attention head of 128 (its head size), value embeddings in every other block, the blocks' output
# projections zero at init, no warmup and a warmdown over the last 65% of the steps, rows packed best-fit with
# attention across documents, its per-group Adam rates (embedding 0.2 and head 0.004, each x (768/128)^0.5 at this
# width) and Adam beta1 0.8. Its Muon rate 0.02 gives an update RMS of 0.02/sqrt(128) for these 128 x 128
# matrices; tinymind's Muon update (scaled to AdamW's RMS) is 0.2 x lr, hence lr 9e-3. Its initialisation by width
# of the weights it does not zero (`nanochat_init_width`) made it weaker here, so the emulation keeps transformers'
# normal init, the stronger reference. Not emulated: its per-layer residual and x0 scalars; its ReLU² feed-forward is
# ungated and 4x wide (here gated at 8/3x, the same parameters); its norms have no gains; it crops documents to
# fill rows (here rows hold whole samples, a long document's windows of a row each).
NANOCHAT = ["--optimizer", "muon", "--learning_rate", "9e-3", "--schedule", "wsd", "--decay_fraction", "0.65",
            "--warmup_steps", "0", "--hidden_act", "relu2", "--qk_norm", "true", "--tie_word_embeddings", "false",
            "--logit_softcap", "15", "--num_attention_heads", "1", "--num_key_value_heads", "1", "--value_embeds",
            "true", "--zero_init_out", "--pack", "shared", "--pack_fit", "best", "--embedding_lr", "0.49",
            "--head_lr", "0.0098", "--adam_beta1", "0.8", "--final_lr_fraction", "0"]
BEST = [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "6e-3", "--tie_word_embeddings",
        "false", "--embedding_lr", "0.1"]
# BEST at 8 rows a step, its rates scaled as nanochat scales them: x sqrt(8 / 16)
BATCH_8 = [*BEST, "--batch_size", "8", "--learning_rate", "4.24e-3", "--embedding_lr", "0.0707"]
RECIPES = {
    "baseline": BASELINE,
    "minimind": [*BASELINE, "--adam_beta2", "0.999", "--weight_decay", "0.01", "--warmup_steps", "0"],
    "adamw_lr_2e-3": [*BASELINE, "--learning_rate", "2e-3"],
    "muon": [*BASELINE, "--optimizer", "muon", "--learning_rate", "2e-3"],
    "muon_wsd": MUON_WSD,
    "default": [],  # 1-pretrain.py's defaults (AS_1_PRETRAIN)
    "default_qk_norm": [*MUON_WSD, "--qk_norm", "true"],
    "default_packed": [*MUON_WSD, "--pack", "isolated"],
    "default_packed_shared": [*MUON_WSD, "--pack", "shared"],
    "default_untied": [*MUON_WSD, "--tie_word_embeddings", "false"],
    "default_best_fit_lr_6e-3": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "6e-3"],
    "default_best_fit_lr_6e-3_value_embeds": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate",
                                              "6e-3", "--value_embeds", "true"],
    # half the rows a step, twice the steps: in a budget this short, more updates may beat larger batches
    "default_best_fit_lr_6e-3_batch_8": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "6e-3",
                                         "--batch_size", "8"],
    "default_best_fit_lr_4e-3_batch_8": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "4e-3",
                                         "--batch_size", "8"],
    # nanochat's per-group rates on the best recipe: a fast embedding, a slow untied head
    "default_best_fit_lr_6e-3_group_rates": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate",
                                             "6e-3", "--tie_word_embeddings", "false", "--embedding_lr", "0.49",
                                             "--head_lr", "0.0098", "--adam_beta1", "0.8"],
    # the best recipe measured from a cold start: best-fit packed rows at lr 6e-3, an untied head and the embedding at
    # lr 0.1
    "best": BEST,
    "best_embedding_lr_0.3": [*BEST, "--embedding_lr", "0.3"],
    "best_embedding_lr_0.05": [*BEST, "--embedding_lr", "0.05"],
    "best_head_lr_3e-3": [*BEST, "--head_lr", "3e-3"],
    "best_head_lr_1.2e-2": [*BEST, "--head_lr", "1.2e-2"],
    "best_head_lr_2.4e-2": [*BEST, "--head_lr", "2.4e-2"],
    "best_head_lr_1.2e-2_weight_decay_0": [*BEST, "--head_lr", "1.2e-2", "--weight_decay", "0"],
    "best_weight_decay_0": [*BEST, "--weight_decay", "0"],
    "best_batch_8": [*BEST, "--batch_size", "8"],
    "best_batch_32": [*BEST, "--batch_size", "32"],
    # nanochat's learning-rate scaling by batch: every rate x sqrt(batch / the reference batch), here 16 rows
    "best_batch_4_sqrt_lr": [*BEST, "--batch_size", "4", "--learning_rate", "3e-3", "--embedding_lr", "0.05"],
    "best_batch_8_sqrt_lr": BATCH_8,
    "best_batch_32_sqrt_lr": [*BEST, "--batch_size", "32", "--learning_rate", "8.49e-3", "--embedding_lr", "0.141"],
    "best_momentum_0.9": [*BEST, "--muon_momentum", "0.9"],
    "best_momentum_0.85": [*BEST, "--muon_momentum", "0.85"],
    "best_warmdown_50": [*BEST, "--decay_fraction", "0.5"],
    "best_final_lr_0": [*BEST, "--final_lr_fraction", "0"],
    # nanochat's initialisation by width (matrices std 1/sqrt(128), embedding std 1, head std 0.001)
    "best_init_width": [*BEST, "--init", "width"],
    "best_init_width_zero_out": [*BEST, "--init", "width", "--zero_init_out"],
    "best_init_width_zero_out_lr_1.2e-2": [*BEST, "--init", "width", "--zero_init_out", "--learning_rate", "1.2e-2"],
    "best_init_width_zero_out_embedding_lr_0.5": [*BEST, "--init", "width", "--zero_init_out", "--embedding_lr", "0.5"],
    "best_init_width_zero_out_lr_1.2e-2_embedding_lr_0.5": [*BEST, "--init", "width", "--zero_init_out",
                                                            "--learning_rate", "1.2e-2", "--embedding_lr", "0.5"],
    "nanochat_init_width": [*NANOCHAT, "--init", "width"],
    "nanochat_grad_clip_0": [*NANOCHAT, "--grad_clip", "0"],  # its later base_train clips no gradient
    # without the two choices that do not export to a stock transformers architecture, one at a time and both
    "nanochat_no_value_embeds": [*NANOCHAT, "--value_embeds", "false"],
    "nanochat_no_softcap": [*NANOCHAT, "--logit_softcap", "0"],
    "nanochat_stock": [*NANOCHAT, "--value_embeds", "false", "--logit_softcap", "0"],
    # the vocabulary nanochat fits (scripts/tok_train.py's default, which its tiny CPU run runs/runcpu.sh keeps)
    "nanochat_vocab_32768": [*NANOCHAT, "--vocab_size", "32768"],
    "best_grad_clip_0": [*BEST, "--grad_clip", "0"],
    # NorMuon: Muon's update normalised per output neuron (nanochat's optimizer normalises along the longer side)
    "best_normuon": [*BEST, "--normuon"],
    "best_normuon_lr_9e-3": [*BEST, "--normuon", "--learning_rate", "9e-3"],
    # larger attention heads at the same width: 2 of 64 (tinymind's head size at its default width), with 2 or 1
    # key-value heads, and nanochat's one of 128
    "best_head64": [*BEST, "--num_attention_heads", "2", "--num_key_value_heads", "2"],
    "best_head64_kv1": [*BEST, "--num_attention_heads", "2", "--num_key_value_heads", "1"],
    "best_head128": [*BEST, "--num_attention_heads", "1", "--num_key_value_heads", "1"],
    # Polar Express: a quintic of its own for each Newton-Schulz step (nanochat's orthogonalisation)
    "best_polar_express": [*BEST, "--polar_express"],
    "best_polar_express_normuon": [*BEST, "--polar_express", "--normuon"],
    "best_batch_8_sqrt_lr_momentum_0.9": [*BATCH_8, "--muon_momentum", "0.9"],
    "best_batch_8_sqrt_lr_momentum_0.9_final_lr_0": [*BATCH_8, "--muon_momentum", "0.9", "--final_lr_fraction", "0"],
    "best_batch_8_sqrt_lr_momentum_0.85": [*BATCH_8, "--muon_momentum", "0.85"],
    "best_batch_8_lr_5e-3_momentum_0.9": [*BEST, "--batch_size", "8", "--learning_rate", "5e-3", "--embedding_lr",
                                          "0.0833", "--muon_momentum", "0.9"],
    "best_batch_8_sqrt_lr_momentum_0.9_warmdown_30": [*BATCH_8, "--muon_momentum", "0.9", "--decay_fraction", "0.3"],
    # a smaller vocabulary: a cheaper head and embedding (at width 128 the head is about a third of a step's
    # arithmetic) against fewer bytes a token; each size gets its own tokenizer fitted to the data (--fit_tokenizer)
    "best_vocab_2048": [*BEST, "--vocab_size", "2048"],
    "best_vocab_4096": [*BEST, "--vocab_size", "4096"],
    # a larger one: more text a row, a dearer head
    "best_vocab_8192": [*BEST, "--vocab_size", "8192"],
    "best_vocab_12288": [*BEST, "--vocab_size", "12288"],
    "best_vocab_16384": [*BEST, "--vocab_size", "16384"],
    # the default with its tokenizer fitted with Llama-3's split: more bytes a token (TOKENIZER_SPLITS)
    "best_llama3_split": BEST,
    "default_best_fit_lr_9e-3": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "9e-3"],
    "default_best_fit_lr_9e-3_untied": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate", "9e-3",
                                        "--tie_word_embeddings", "false"],
    "default_best_fit_lr_9e-3_untied_wd65": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best", "--learning_rate",
                                             "9e-3", "--tie_word_embeddings", "false", "--decay_fraction", "0.65"],
    "default_z_loss": [*MUON_WSD, "--z_loss", "1e-4"],
    "nanochat": NANOCHAT,
    "default_relu2": [*MUON_WSD, "--hidden_act", "relu2"],
    "default_value_embeds": [*MUON_WSD, "--value_embeds", "true"],
    "default_head64": [*MUON_WSD, "--num_attention_heads", "2", "--num_key_value_heads", "2"],
    "default_softcap": [*MUON_WSD, "--logit_softcap", "15"],
    "default_zero_init": [*MUON_WSD, "--zero_init_out"],
    "default_warmdown65": [*MUON_WSD, "--decay_fraction", "0.65"],
    "default_best_fit": [*MUON_WSD, "--pack", "shared", "--pack_fit", "best"],
    # the embedding, final norm and head first fitted to the data's bigram counts (trainer/bigram.py), then trained
    # on at `best`'s rates (the embedding at 0.1 undoes the fit in its first steps), or at rates far below them
    "best_bigram_10": [*BEST, "--bigram_steps", "10"],
    "best_bigram_20": [*BEST, "--bigram_steps", "20"],
    "best_bigram_40": [*BEST, "--bigram_steps", "40"],
    "best_bigram_40_tables_1e-2": [*BEST, "--bigram_steps", "40", "--embedding_lr", "0.01", "--head_lr", "2e-3"],
    # the warm start with the tables at 3e-3 and 1e-3: the recipe that beat nanochat in half its time at 100 s
    "warm_start": [*BEST, "--bigram_steps", "40", "--embedding_lr", "0.003", "--head_lr", "1e-3"],
    "default_lr_4e-3": [*MUON_WSD, "--learning_rate", "4e-3"],
    "default_lr_9e-3": [*MUON_WSD, "--learning_rate", "9e-3"],
    "moe_baseline": [*BASELINE, *MOE],
    "moe": MOE,  # `1-pretrain.py --model_type moe` now
    "moe_cold": [*MOE, "--bigram_steps", "0"],  # the same never warm-started
    "moe_default": [*MUON_WSD, *MOE],
    # top-1 with the router's probability as the expert's weight (renormalised, it would be 1: no gradient)
    "moe_top1": [*MUON_WSD, *MOE, "--num_experts_per_tok", "1", "--norm_topk_prob", "false"],
    # DeepSeek-V3's balancing: a per-expert routing bias instead of the aux loss
    "moe_top1_bias": [*MUON_WSD, *MOE, "--num_experts_per_tok", "1", "--norm_topk_prob", "false",
                      "--expert_bias_rate", "1e-3", "--aux_loss_alpha", "0"],
    # finer experts: 8 of half the width, top-2, and a shared one of that width (active width 576; top-1: 768)
    "moe_fine_bias": [*MUON_WSD, *MOE, "--n_routed_experts", "8", "--intermediate_size", "192",
                      "--expert_bias_rate", "1e-3", "--aux_loss_alpha", "0"],
    # the same two changes on the present recipe: the bias alone, then with the finer experts
    "moe_bias": [*MOE, "--expert_bias_rate", "1e-3", "--aux_loss_alpha", "0"],
    "moe_fine": [*MOE, "--n_routed_experts", "8", "--intermediate_size", "192", "--expert_bias_rate", "1e-3",
                 "--aux_loss_alpha", "0"],
}


# Recipes that run as 1-pretrain.py does, from its defaults and its short-plan rule (their flags are what they add);
# every other recipe is its flags alone.
AS_1_PRETRAIN = {"default", "moe", "moe_cold", "moe_bias", "moe_fine"}


# Recipes whose flags hold at the benchmark's width of 128 only: nanochat's one head of 128 and its rates scaled to
# that width, head size 64 as 2 heads, experts of half the width.
WIDTH_128 = {"nanochat", "nanochat_init_width", "nanochat_grad_clip_0", "nanochat_vocab_32768", "nanochat_no_value_embeds",
             "nanochat_no_softcap", "nanochat_stock", "default_head64",
             "best_head64", "best_head64_kv1", "best_head128", "moe_fine_bias", "moe_fine"}


# With --fit_tokenizer each recipe trains with a tokenizer fitted with GPT-2's split (scripts.train_tokenizer's
# default), or with the split named here. nanochat's own split is GPT-4's pattern, Llama-3's but for digits in pairs;
# Llama-3's carries more bytes a token on the prose corpus (3.40 against GPT-2's 3.17 at 6,400 tokens) but learned no
# more per byte there (`best_llama3_split`), so the emulation keeps GPT-2's: the stronger reference.
TOKENIZER_SPLITS = {"best_llama3_split": "llama3"}


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
    # No default held-out file: a run evaluates only on the --val_data `train` gives it (the step-time calibration
    # runs on no held-out data at all).
    as_1_pretrain = {"defaults": PRETRAIN_DEFAULTS, "short_plan": PRETRAIN_SHORT_PLAN} if recipe in AS_1_PRETRAIN else {}
    return Stage(name="pretrain", description="", dataset=PaddedToMaximum if recipe == "minimind" else PretrainDataset,
                 default_data="data/pretrain.jsonl", default_val="", packs=True, z_loss=True, **as_1_pretrain)


def named(spec):
    """The recipe a `--recipes` entry names: `default`, or `default@50` for the same recipe with a budget of its own."""
    return spec.split("@")[0]


def budget(spec, args):
    """The training seconds of a `--recipes` entry: its own after an `@`, else --budget."""
    return float(spec.split("@")[1]) if "@" in spec else args.budget


def shape(args):
    """The reference recipe's model and batch, in words."""
    run = resolved(args.reference, args)
    return (f"hidden {run.hidden_size} × {run.num_hidden_layers} layers{' MoE' * (run.model_type == 'moe')}, batch "
            f"{run.batch_size} × {run.max_seq_len}")


def resolved(recipe, args):
    """The recipe's flags as its run reads them: the benchmark's shape (or the --config preset, as
    1-pretrain.py --config reads it), then the recipe's own."""
    return parse(stage_parser(stage_for(named(recipe))), [*args.model, *RECIPES[named(recipe)], "--device", args.device])


def tokenizer_kind(recipe, args):
    """(vocabulary size, split) of the recipe's tokenizer: the benchmark's size unless the recipe gives its own, and
    the split its TOKENIZER_SPLITS entry names (None: the benchmark's tokenizer, fitted or given)."""
    return resolved(recipe, args).vocab_size, TOKENIZER_SPLITS.get(named(recipe))


def run_log(recipe, out_dir, args, *flags):
    """Train the recipe with `flags` into `out_dir`; its CSV log."""
    argv = [*args.model, *RECIPES[named(recipe)], *flags, "--data_path", args.data, "--seed", str(args.seed),
            "--device", args.device, "--tokenizer_path", args.tokenizers[tokenizer_kind(recipe, args)],
            "--save_interval", str(10**9), "--out_dir", str(out_dir)]
    train_stage(stage_for(named(recipe)), argv)
    run = resolved(recipe, args)
    moe = run.model_type == "moe"
    return pd.read_csv(Path(out_dir) / f"pretrain_{run.model_type}" / f"pretrain_{run.hidden_size}{'_moe' * moe}_log.csv")


def train(recipe, steps, args, out_dir):
    every = str(max(1, steps // args.evaluations))
    log = run_log(recipe, out_dir, args, "--val_data", args.val, "--val_samples", str(args.val_samples),
                  "--max_steps", str(steps), "--eval_interval", every, "--log_interval", every)
    return log[log["val_bits_per_byte"].notna()][["step", "tokens", "seconds", "val_bits_per_byte"]]


def step_timing(recipe, args, out_dir):
    """(mean step time, the seconds before the steps) of a short run of the recipe, its first steps left out as
    warm-up. The mean, not the median: batches of short samples are quick and of long ones slow, and a corpus of
    mostly short documents would make the median step a quick one, the schedule too long for the budget. The
    seconds before the steps (the bigram warm start, and whatever else the first step costs beyond the others, a
    compilation on CUDA) come off each run's budget."""
    log = run_log(recipe, out_dir, args, "--max_steps", str(args.calibration_steps), "--log_interval", "1")
    seconds = log["seconds"]
    step = float(seconds.diff().dropna().iloc[min(5, args.calibration_steps // 2):].mean())
    return step, max(0.0, float(seconds.iloc[0]) - step)


def reached(curve, target):
    """The first training second at which the held-out bits per byte was at or below `target`."""
    hits = curve[curve["val_bits_per_byte"] <= target + 1e-9]
    return float(hits["seconds"].iloc[0]) if len(hits) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=180, help="training seconds per recipe")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the recipes, interleaved")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="RECIPE[@SECONDS]",
                        help=f"recipes to race, each with --budget or its own budget after an @ (`default@50`: does "
                             f"it reach the reference's final in half the time?); any of {', '.join(RECIPES)}")
    parser.add_argument("--reference", default="baseline", choices=list(RECIPES),
                        help="the recipe whose final bits per byte the others race to (MoE recipes race moe_baseline "
                             "when it runs)")
    parser.add_argument("--evaluations", type=int, default=10, help="held-out evaluations per run")
    parser.add_argument("--val_samples", type=int, default=128)
    parser.add_argument("--time_tolerance", type=float, default=0.05,
                        help="a run whose training time ends further than this share from its budget is trained "
                             "again, its step count scaled by budget / seconds (default 0.05; 1 never re-runs)")
    parser.add_argument("--calibration_steps", type=int, default=64,
                        help="steps of each recipe timed (twice) to turn the budget into its step count")
    parser.add_argument("--data", default="data/pretrain.jsonl")
    parser.add_argument("--val", default="data/pretrain_val.jsonl")
    parser.add_argument("--tokenizer_path", default=str(SHIPPED),
                        help="the tokenizer every recipe of the benchmark's vocabulary (6,400) trains with")
    parser.add_argument("--fit_tokenizer", action="store_true",
                        help="first fit tokenizers to --data (scripts.train_tokenizer), one for each vocabulary size "
                             "and split the recipes use, and train each recipe with its own")
    parser.add_argument("--config", help="a preset (configs/small.json) every recipe starts from, as 1-pretrain.py "
                                         "--config reads it, in place of the benchmark's shape (width 128, 4 layers, "
                                         "16 x 256 tokens a step); a recipe's own flags still win")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="output/bench_learning.png", help="the PNG of bits per byte against seconds")
    args = parser.parse_args(argv)
    args.model = ["--config", args.config] if args.config else MODEL
    for spec in args.recipes:
        if named(spec) not in RECIPES or "@" in spec and not spec.split("@")[1].replace(".", "", 1).isdigit():
            parser.error(f"--recipes {spec}: not a recipe (RECIPE or RECIPE@SECONDS; recipes: {', '.join(RECIPES)})")
    width = resolved(args.reference, args).hidden_size
    for spec in [args.reference, *args.recipes]:
        if named(spec) in WIDTH_128 and width != 128:
            parser.error(f"--recipes {spec}: its flags hold at width 128 only (head sizes, widths and rates set for "
                         f"it), and --config's model is {width} wide")
    for path in (args.data, args.val):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such file; run `python -m scripts.prepare_data` first")
    recipes = [args.reference, *[r for r in args.recipes if r != args.reference]]
    print(f"shape: {shape(args)}", flush=True)
    curves = {recipe: [] for recipe in recipes}
    with tempfile.TemporaryDirectory() as scratch:
        # A tokenizer for each vocabulary size and split the recipes use, fitted to --data (or the one given)
        args.tokenizers = {}
        kinds = {tokenizer_kind(recipe, args): named(recipe) for recipe in recipes}
        for (size, split), recipe in sorted(kinds.items(), key=str):
            if args.fit_tokenizer:
                args.tokenizers[size, split] = str(Path(scratch) / f"tokenizer_{size}_{split or SPLITS[0]}")
                fit(Path(args.data), Path(args.tokenizers[size, split]), size, split=split or SPLITS[0])
                report_compression(Path(args.tokenizers[size, split]), SHIPPED, Path(args.val))
            elif split:
                raise SystemExit(f"error: --recipes {recipe} trains with a tokenizer fitted with the {split} split: "
                                 "add --fit_tokenizer")
            elif size == len(load_tokenizer(args.tokenizer_path)):
                args.tokenizers[size, split] = args.tokenizer_path
            else:
                raise SystemExit(f"error: --recipes {recipe} has a vocabulary of {size}, --tokenizer_path another: "
                                 "add --fit_tokenizer")
        # Each recipe's step count, from step times measured twice, interleaved: every round then runs the same
        # schedule, and a neighbour slowing the machine for a while skews no recipe alone.
        timings = {named(recipe): [] for recipe in recipes}
        for attempt in range(2):
            for recipe in timings:
                timings[recipe].append(step_timing(recipe, args, Path(scratch) / f"calibrate_{recipe}_{attempt}"))
        steps = {recipe: max(8, int((budget(recipe, args) - statistics.median(t[1] for t in timings[named(recipe)]))
                                    / statistics.median(t[0] for t in timings[named(recipe)])))
                 for recipe in recipes}
        print("steps per recipe:", steps, flush=True)
        for round_ in range(args.repeats):
            for recipe in recipes:
                started = time.perf_counter()
                curve = train(recipe, steps[recipe], args, Path(scratch) / f"{recipe}_{round_}")
                seconds = curve["seconds"].iloc[-1]
                if abs(seconds / budget(recipe, args) - 1) > args.time_tolerance:
                    # The machine's speed drifted since the calibration: this schedule ended too early or too
                    # late for the budget. Trained again with the step time this run measured (for later rounds too).
                    again = max(8, round(steps[recipe] * budget(recipe, args) / seconds))
                    print(f"round {round_ + 1}, {recipe}: {steps[recipe]} steps took {seconds:.0f} s of its "
                          f"{budget(recipe, args):g}; trained again with {again}", flush=True)
                    steps[recipe], started = again, time.perf_counter()
                    curve = train(recipe, again, args, Path(scratch) / f"{recipe}_{round_}_again")
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
        return "moe_baseline" if recipe.startswith("moe") and "moe_baseline" in curves else args.reference

    print(f"\n{args.budget:.0f} s budget, {args.repeats} round(s), medians; 'reach' is the training time to the final "
          f"held-out bits per byte of {args.reference} (of moe_baseline for MoE recipes)")
    print(f"| recipe | steps | real tokens | seconds | held-out bits per byte | reach {args.reference} | "
          f"time vs {args.reference} |")
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
    ax.set_title(f"{shape(args)}, {args.budget:.0f} s per recipe")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
