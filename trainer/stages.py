"""What a training stage does, shared by the stage scripts: flags → tokenizer, data, model, objective → loop.

A stage script describes itself as a `Stage` and calls `train_stage`; everything else is here and in the loop.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dataset import DataError, Packed, load_tokenizer, same_tokenizer, save_tokenizer, tokenizer_beside
from model import CheckpointError, TinyMindConfig, TinyMindForCausalLM, config_path

from . import distributed
from .bigram import warm_start
from .distributed import say
from .errors import UserError
from .flags import (add_model_flags, add_training_flags, checked_config, flag_overrides, model_config, new_parser,
                    parse)
from .loading import load_flagged
from .loop import Trainer, plan_steps, write_model_weights
from .objectives import LanguageModeling
from .run_folder import prepare_run_dir, run_paths


def run_cli(main):
    """Run a stage's main; a mistake the user can fix ends in one `error:` line and exit code 2."""
    try:
        main()
    except (UserError, DataError, CheckpointError) as err:
        say(f"error: {err}", err=True)
        raise SystemExit(2) from None


# 1-pretrain.py's recipe, the one scripts/bench_learning.py measured best over a demo's length (its `default`, and
# `best`): Muon on the blocks' matrices at lr 6e-3 with warmup-stable-decay, rows packed best-fit with whole samples
# and attention across them, an untied head, and the embedding at lr 0.1 (for a tied embedding, which is also the
# head, the embedding's rate is --learning_rate unless --embedding_lr is given).
PRETRAIN_DEFAULTS = {"optimizer": "muon", "learning_rate": 6e-3, "schedule": "wsd", "pack": "shared",
                     "pack_fit": "best", "tie_word_embeddings": False, "embedding_lr": 0.1}
# A short plan starts warm: a model from random init with an untied head, planned for at most SHORT_PLAN_STEPS
# steps, first fits its embedding, final norm and head to the data's bigram counts (trainer/bigram.py), and those
# then train at rates far below a cold start's. At width 128 (docs/learning.md) it ends ahead of the cold recipe in
# plans of up to about 240 steps on the default corpus (3.3% lower bits per byte at 150 steps) and 400 on English
# prose, and behind it beyond (3.3% higher over the demo's 567 steps). Unless the command line or preset gives any of
# these flags: then the run is as given.
SHORT_PLAN_STEPS = 200
PRETRAIN_SHORT_PLAN = {"bigram_steps": 40, "embedding_lr": 0.003, "head_lr": 1e-3}


def language_modeling(model, args, start, tokenizer):
    """The objective of the stages that train on text: next-token cross-entropy (plus --z_loss)."""
    return LanguageModeling(args.z_loss)


@dataclass
class Stage:
    """A training stage: a dataset and an objective, where it starts from, and anything of its own."""

    name: str  # names the run folder and files: output/{name}_{type}/{name}_{hidden}[_moe].pth
    description: str
    # (path, tokenizer, max_length, skip_bad_lines=False) → the dataset of its samples
    dataset: Callable
    default_data: str
    default_val: str
    start_from: str | None = None  # the stage whose matching checkpoint it starts from, unless --init_from
    start_required: bool = False  # True where training from random weights is pointless: missing start = error
    # (model, args, start weights or None, the run's tokenizer) → the Objective the loop optimises
    make_objective: Callable = language_modeling
    # args → the weights whose tokenizer a run takes when no flag, resume state or starting weights give one
    # (distillation: the teacher's)
    tokenizer_from: Callable = lambda args: None
    add_flags: Callable = lambda parser: None  # the stage's own flags
    same_run_flags: tuple = ()  # those of them a resumed run must keep (what its saved state was built with)
    check_flags: Callable = lambda args: None  # and their checks (a value no run can use: a UserError)
    adapt_model: Callable = lambda model, args: model  # the module to train, made from the built model
    write_weights: Callable = write_model_weights  # (model, its full state dict, RunPaths): what later stages read
    defaults: dict = field(default_factory=dict)  # the stage's own flag defaults; presets and flags override them
    # and those of a plan of at most SHORT_PLAN_STEPS steps from random init (pretraining: the warm start)
    short_plan: dict = field(default_factory=dict)
    # What the stage does with the shared flags some stages have no use for (refused where it is False):
    packs: bool = False  # its samples are token sequences that --pack may put back to back
    z_loss: bool = False  # its objective adds --z_loss
    # --compile on CUDA unless turned off; False where the batches' widths cannot be bucketed (GRPO's sampled
    # completions), so a compiled model would recompile for every new width
    compiles_by_default: bool = True


def stage_parser(stage: Stage):
    """The stage's flags (the model's, the loop's and its own), with its own defaults under any preset and command
    line."""
    parser = new_parser(stage.description)
    add_model_flags(parser)
    add_training_flags(parser, stage.default_data)
    stage.add_flags(parser)
    parser.set_defaults(**stage.defaults)
    return parser


def train_stage(stage: Stage, argv=None):
    """Parse the flags and train `stage`."""
    parser = stage_parser(stage)
    args = parse(parser, argv)
    stage.check_flags(args)
    # Shared flags some stages have no use for: refused before any data is read, not silently ignored.
    if args.z_loss and not stage.z_loss:
        parser.error(f"--z_loss: only the language-modelling stages (pretraining, SFT, LoRA) add it, not {stage.name}")
    if args.pack != "none" and not stage.packs:
        parser.error(f"--pack {args.pack}: only text and chat samples are packed, not {stage.name}'s")
    # Flags that would do nothing as given: refused, naming what they need.
    if "pack_fit" in args.given_flags and args.pack_fit != "next" and args.pack == "none":
        parser.error(f"--pack_fit {args.pack_fit}: it says how --pack fills rows; add --pack isolated or shared")
    if "decay_fraction" in args.given_flags and args.schedule != "wsd":
        parser.error("--decay_fraction: it shapes the warmup-stable-decay schedule; add --schedule wsd")
    if not stage.compiles_by_default and "compile" not in args.given_flags:
        args.compile = False
    if args.val_data is None and Path(stage.default_val).is_file():
        args.val_data = stage.default_val
    if "eval_interval" in args.given_flags and not (args.val_data or args.eval_tasks):
        parser.error("--eval_interval: it says how often to evaluate --val_data or --eval_tasks; give one of them")
    if "eval_limit" in args.given_flags and not args.eval_tasks:
        parser.error("--eval_limit: it caps the examples of each --eval_tasks task; add --eval_tasks")
    if args.fsdp and not distributed.launched_by_torchrun():
        parser.error("--fsdp: it shards the model across the processes torchrun starts; run under torchrun "
                     "--nproc_per_node N (one process has nothing to shard)")
    distributed.setup(args)
    try:
        train(stage, args)
    except BaseException:
        distributed.shutdown(finished=False)
        raise
    distributed.shutdown()


def train(stage, args):
    paths = run_paths(stage.name, args)
    start = start_weights(stage, args)
    distributed.main_process_alone(lambda: prepare_run_dir(paths, args))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    built = build_model(stage.name, start, args)
    fresh = start is None and not args.resume
    tokenizer = run_tokenizer(args, paths, [start, stage.tokenizer_from(args)], built.config.vocab_size, fresh)
    with distributed.main_process_first():
        dataset = stage.dataset(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
        if args.pack != "none":
            dataset = Packed(dataset, isolated=args.pack == "isolated", best_fit=args.pack_fit == "best")
        val = stage.dataset(args.val_data, tokenizer, args.max_seq_len) if args.val_data else None
    for note in dataset.notes() + (val.notes() if val else []):
        say(note, err=True)
    if built.config.tie_word_embeddings and "embedding_lr" not in args.given_flags:
        args.embedding_lr = None  # a stage's embedding rate is for an embedding of its own, not one that is the head
    if start is None:
        start_short_plan(stage, args, built.config, len(dataset))
    warm_seconds = warm_start(built, dataset, args.bigram_steps, args.device) if fresh and args.bigram_steps else 0
    model = stage.adapt_model(built, args)
    objective = stage.make_objective(model, args, start, tokenizer)
    trainer = Trainer(model, dataset, objective, args, paths, stage.write_weights, val, tokenizer,
                      stage.same_run_flags)
    trainer.progress.seconds = warm_seconds  # the warm start is training time (a resumed run reads its own)
    say(describe_run(trainer.raw_model, dataset, trainer))
    say(describe_optimizer(trainer))
    trainer.train()
    say(f"saved {paths.weights}")


def start_short_plan(stage, args, config, samples):
    """Give `args` the stage's short-plan defaults where the run, from random init, plans at most SHORT_PLAN_STEPS
    steps, its head is untied and none of those flags was given (a resumed run decides as its first part did)."""
    if not stage.short_plan or config.tie_word_embeddings or stage.short_plan.keys() & args.given_flags:
        return
    steps, _ = plan_steps(args, samples, distributed.world_size())
    if steps <= SHORT_PLAN_STEPS:
        vars(args).update(stage.short_plan)
        flags = " ".join(f"--{flag} {value:g}" for flag, value in stage.short_plan.items())
        say(f"a short plan ({steps} steps, at most {SHORT_PLAN_STEPS}) starts warm: {flags} (pass --bigram_steps 0 "
            "for a cold start)")


def run_tokenizer(args, paths, weights, vocab_size, fresh):
    """--tokenizer_path, else the run's own (resumed), else the first one saved with `weights` (the starting weights,
    then any the stage names: a distillation's teacher), else the project's; it must fit the model's `vocab_size`
    (a `fresh` model's from --vocab_size). Saved in the run folder, so it travels with the run's checkpoints."""
    own = tokenizer_beside(paths.weights) if args.resume else None
    tokenizer = load_tokenizer(args.tokenizer_path or own
                               or next(filter(None, (tokenizer_beside(w) for w in weights if w)), None))
    if args.tokenizer_path and own and not same_tokenizer(tokenizer, load_tokenizer(own)):
        raise UserError(f"--resume: --tokenizer_path {args.tokenizer_path} is not the tokenizer the run in {paths.dir} "
                        f"trains with ({own}); drop --tokenizer_path to continue it")
    if len(tokenizer) > vocab_size:
        fix = (f"--vocab_size is {vocab_size}; pass --vocab_size {len(tokenizer)} or more" if fresh else
               f"the model has {vocab_size}; pass the --tokenizer_path its weights were trained with")
        raise UserError(f"the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but {fix}")
    saved = paths.dir / "tokenizer"
    distributed.main_process_alone(lambda: save_tokenizer(tokenizer, saved))
    say(f"tokenizer: {tokenizer.name_or_path} ({len(tokenizer):,} tokens), saved with the run in {saved}")
    return tokenizer


def describe_run(model, dataset, trainer):
    total, active = model.parameter_counts()
    args = trainer.args
    planned = trainer.total_steps * trainer.samples_per_step * (args.max_seq_len - 1)
    return (
        f"model: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token | "
        f"data: {len(dataset):,} samples from {Path(args.data_path)} | plan: {trainer.total_steps:,} steps × "
        f"{trainer.samples_per_step} samples × {args.max_seq_len - 1} tokens = {planned / 1e6:.1f}M token slots"
    )


def describe_optimizer(trainer):
    args = trainer.args
    muon = "NorMuon" if getattr(args, "normuon", False) else "Muon"
    muon += " (Polar Express)" if getattr(args, "polar_express", False) else ""
    which = f"{muon} on the blocks' matrices, AdamW on the rest" if args.optimizer == "muon" else "AdamW"
    schedule = "warmup-stable-decay" if args.schedule == "wsd" else "cosine"
    steps = trainer.warmup_steps
    own = "".join(f", {what} lr {getattr(args, flag):g}"
                  for flag, what in (("embedding_lr", "embedding"), ("head_lr", "head"))
                  if getattr(args, flag, None) is not None)
    return (f"optimizer: {which}, peak lr {args.learning_rate:g}{own}, {steps} warmup step{'s' * (steps != 1)}, "
            f"{schedule} to {args.final_lr_fraction:g} x lr")


def build_model(stage_name, start, args):
    """The model a stage trains: the config of the weights it starts from (or, resumed, the run's own saved
    config) with the model flags given applied over it; from the flags alone when it starts from random init."""
    if args.resume:
        own = config_path(run_paths(stage_name, args).existing_weights())
        if not own.is_file():
            return new_model(args)
        return TinyMindForCausalLM(checked_config({**TinyMindConfig.from_json_file(own).to_dict(), **flag_overrides(args)}))
    if start is None:
        return new_model(args)
    for flag, shaped in (("zero_init_out", args.zero_init_out), ("init", args.init != "normal"),
                         ("bigram_steps", args.bigram_steps)):
        if shaped:
            raise UserError(f"--{flag}: it shapes a model from random init, and this one starts from {start}")
    model = load_flagged(start, args)
    if args.max_seq_len > model.config.max_position_embeddings:
        raise UserError(f"--max_seq_len {args.max_seq_len} exceeds the max_position_embeddings "
                        f"{model.config.max_position_embeddings} of {start}")
    say(f"initialised from {start}")
    return model


def new_model(args):
    """A model from random init: --init's scheme, then the blocks' output projections zeroed with --zero_init_out."""
    model = TinyMindForCausalLM(model_config(args))
    config = model.config
    with torch.no_grad():
        if args.init == "width":
            if config.tie_word_embeddings:
                raise UserError("--init width gives the embedding std 1 and the head std 0.001, which a tied table "
                                "cannot be: add --tie_word_embeddings false")
            bound = (3 / config.hidden_size) ** 0.5  # uniform on [-bound, bound]: std 1/sqrt(hidden_size)
            for name, parameter in model.named_parameters():
                if name.endswith("_proj.weight") or ".value_embeds." in name:
                    parameter.uniform_(-bound, bound)
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
            model.lm_head.weight.normal_(0.0, 0.001)
        if args.zero_init_out:
            for name, parameter in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    parameter.zero_()
    return model


def start_weights(stage, args):
    """--init_from, else the previous stage's matching checkpoint, else None (saying so when one was expected,
    or refusing when the stage cannot start from random weights)."""
    if args.init_from:
        return args.init_from
    if stage.start_from is None:
        return None
    previous = run_paths(stage.start_from, args).existing_weights()
    if previous.is_file():
        return previous
    if stage.start_required:
        raise UserError(f"no {previous}: {stage.name} starts from a trained model; run the {stage.start_from} "
                        f"stage first or pass --init_from PATH")
    say(f"no {previous} (run {stage.start_from} first or pass --init_from): starting from random init")
    return None
