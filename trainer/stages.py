"""What a training stage does, shared by the stage scripts: flags → tokenizer, data, model, objective → loop."""

import random
from pathlib import Path

import torch

from dataset import DataError, load_tokenizer
from model import TinyMindConfig, TinyMindForCausalLM

from . import distributed
from .checkpoint import config_path, load_into, load_model, prepare_run_dir, run_paths
from .distributed import say
from .errors import UserError
from .evaluate import perplexity
from .flags import MODEL_FLAGS, add_model_flags, add_training_flags, model_config, new_parser, parse
from .loop import Trainer
from .objectives import LanguageModeling


def run_cli(main):
    """Run a stage's main; a mistake the user can fix ends in one `error:` line and exit code 2."""
    try:
        main()
    except (UserError, DataError) as err:
        say(f"error: {err}", err=True)
        raise SystemExit(2) from None


def train_stage(stage, description, dataset_class, default_data, default_val, start_from_stage=None,
                make_objective=lambda model, args: LanguageModeling(), argv=None):
    """Parse the flags and train `stage`: `make_objective(model, args)` gives what the loop optimises."""
    parser = new_parser(description)
    add_model_flags(parser)
    add_training_flags(parser, default_data)
    args = parse(parser, argv)
    if args.val_data is None and Path(default_val).is_file():
        args.val_data = default_val
    distributed.setup(args)
    try:
        train(stage, dataset_class, start_from_stage, make_objective, args)
    finally:
        distributed.shutdown()


def train(stage, dataset_class, start_from_stage, make_objective, args):
    paths = run_paths(stage, args)
    distributed.main_process_alone(lambda: prepare_run_dir(paths, args))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if len(tokenizer) > args.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --vocab_size is {args.vocab_size}")
    with distributed.main_process_first():
        dataset = dataset_class(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
        val = dataset_class(args.val_data, tokenizer, args.max_seq_len) if args.val_data else None
    for note in dataset.notes() + (val.notes() if val else []):
        say(note, err=True)
    model = build_model(stage, start_from_stage, args)
    trainer = Trainer(model, dataset, make_objective(model, args), args, paths)
    say(describe_run(model, dataset, trainer))
    if val is not None and not args.resume:  # a resumed run's "before" was printed by the run it continues
        say(f"held-out perplexity before {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    trainer.train()
    if val is not None:
        say(f"held-out perplexity after {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    say(f"saved {paths.weights}")


def describe_run(model, dataset, trainer):
    total, active = model.parameter_counts()
    args = trainer.args
    planned = trainer.total_steps * trainer.samples_per_step * (args.max_seq_len - 1)
    return (
        f"model: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token | "
        f"data: {len(dataset):,} samples from {Path(args.data_path)} | plan: {trainer.total_steps:,} steps × "
        f"{trainer.samples_per_step} samples × {args.max_seq_len - 1} tokens = {planned / 1e6:.1f}M token slots"
    )


def build_model(stage, start_from_stage, args):
    """The model a stage trains: its shape from the flags, every field no flag sets (rope_theta, rms_norm_eps,
    a tied or untied head, ...) from the weights it starts from, or, resumed, from the run's own saved config."""
    flagged = model_config(args)
    if args.resume:
        own = config_path(run_paths(stage, args).existing_weights())
        return TinyMindForCausalLM(inherit(flagged, TinyMindConfig.from_json_file(own)) if own.is_file() else flagged)
    source = start_weights(start_from_stage, args)
    if source is None:
        return TinyMindForCausalLM(flagged)
    loaded = load_model(source, fallback_config=flagged)
    model = TinyMindForCausalLM(inherit(flagged, loaded.config))
    if args.max_seq_len > model.config.max_position_embeddings:
        raise UserError(f"--max_seq_len {args.max_seq_len} exceeds the max_position_embeddings "
                        f"{model.config.max_position_embeddings} of {source}")
    load_into(model, loaded.state_dict(), source)
    say(f"initialised from {source}")
    return model


def inherit(flagged, source):
    """`source`'s config with the fields the flags set taken from `flagged`."""
    flag_fields = {name: getattr(flagged, name) for name in (*MODEL_FLAGS, "use_moe")}
    return TinyMindConfig.from_dict({**source.to_dict(), **flag_fields})


def start_weights(start_from_stage, args):
    """--init_from, else the previous stage's matching checkpoint, else None (saying so when one was expected)."""
    if args.init_from:
        return args.init_from
    if start_from_stage is None:
        return None
    previous = run_paths(start_from_stage, args).existing_weights()
    if previous.is_file():
        return previous
    say(f"no {previous} (run {start_from_stage} first or pass --init_from): starting from random init")
    return None
