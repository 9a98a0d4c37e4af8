"""What a training stage does, shared by 1-pretrain.py and 2-sft.py: flags → tokenizer, data, model → loop."""

import random
import sys
from pathlib import Path

import torch

from dataset import DataError, load_tokenizer
from model import TinyMindConfig, TinyMindForCausalLM

from . import distributed
from .checkpoint import config_path, load_into, load_model
from .distributed import print0
from .errors import UserError
from .evaluate import perplexity
from .flags import MODEL_FIELDS, add_model_flags, add_training_flags, checkpoint_path, model_config, new_parser, parse
from .loop import Trainer, describe_run, prepare_run_dir


def run_cli(main):
    """Run a stage's main; a mistake the user can fix ends in one `error:` line and exit code 2."""
    try:
        main()
    except (UserError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train_stage(stage, description, dataset_class, default_data, default_val, start_from_stage=None, argv=None):
    parser = new_parser(description)
    add_model_flags(parser)
    add_training_flags(parser, default_data)
    args = parse(parser, argv)
    if args.val_data is None and Path(default_val).is_file():
        args.val_data = default_val
    distributed.setup(args)
    try:
        train(stage, dataset_class, start_from_stage, args)
    finally:
        distributed.shutdown()


def train(stage, dataset_class, start_from_stage, args):
    distributed.main_process_alone(lambda: prepare_run_dir(stage, args))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if len(tokenizer) > args.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --vocab_size is {args.vocab_size}")
    with distributed.main_process_first():
        dataset = dataset_class(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
        val = dataset_class(args.val_data, tokenizer, args.max_seq_len) if args.val_data else None
    model = build_model(stage, start_from_stage, args)
    trainer = Trainer(model, dataset, args, stage, tokenizer.pad_token_id)
    print0(describe_run(model, dataset, trainer))
    if val is not None and not args.resume:  # a resumed run's "before" was printed by the run it continues
        print0(f"held-out perplexity before {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    trainer.train()
    if val is not None:
        print0(f"held-out perplexity after {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    print0(f"saved {trainer.weights_path}")


def build_model(stage, start_from_stage, args):
    """The model a stage trains: its shape from the flags, every field no flag sets (rope_theta, rms_norm_eps,
    a tied or untied head, ...) from the weights it starts from, or, resumed, from the run's own saved config."""
    flagged = model_config(args)
    if args.resume:
        own = config_path(checkpoint_path(stage, args))
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
    print0(f"initialised from {source}")
    return model


def inherit(flagged, source):
    """`source`'s config with the fields the flags set taken from `flagged`."""
    flag_fields = {name: getattr(flagged, name) for name in (*MODEL_FIELDS, "use_moe")}
    return TinyMindConfig.from_dict({**source.to_dict(), **flag_fields})


def start_weights(start_from_stage, args):
    """--init_from, else the previous stage's matching checkpoint, else None (saying so when one was expected)."""
    if args.init_from:
        return args.init_from
    if start_from_stage is None:
        return None
    previous = checkpoint_path(start_from_stage, args)
    if previous.is_file():
        return previous
    print0(f"no {previous} (run {start_from_stage} first or pass --init_from): starting from random init")
    return None
