"""What a training stage does, shared by 1-pretrain.py and 2-sft.py: flags → tokenizer, data, model → loop."""

import random
import sys
from pathlib import Path

import torch

from dataset import DataError, load_tokenizer
from model import TinyMindForCausalLM

from . import distributed
from .checkpoint import load_into, read_weights
from .distributed import print0
from .errors import UserError
from .evaluate import perplexity
from .flags import add_model_flags, add_training_flags, checkpoint_path, model_config, new_parser, parse
from .loop import Trainer, describe_run


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
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if len(tokenizer) > args.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --vocab_size is {args.vocab_size}")
    with distributed.main_process_first():
        dataset = dataset_class(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
        val = dataset_class(args.val_data, tokenizer, args.max_seq_len) if args.val_data else None
    model = TinyMindForCausalLM(model_config(args))
    if not args.resume:
        initialise(model, args, start_from_stage)

    trainer = Trainer(model, dataset, args, stage, tokenizer.pad_token_id)
    print0(describe_run(model, dataset, trainer))
    if val is not None:
        print0(f"held-out perplexity before {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    trainer.train()
    if val is not None:
        print0(f"held-out perplexity after {stage}: {perplexity(trainer.model, val, args, args.val_samples):.2f}")
    print0(f"saved {trainer.weights_path}")


def initialise(model, args, start_from_stage):
    """--init_from, else the previous stage's matching checkpoint, else (saying so) random init."""
    if args.init_from:
        load_into(model, read_weights(args.init_from), args.init_from)
        print0(f"initialised from {args.init_from}")
        return
    if start_from_stage is None:
        return
    previous = checkpoint_path(start_from_stage, args)
    if previous.is_file():
        load_into(model, read_weights(previous), previous)
        print0(f"initialised from {previous}")
    else:
        print0(f"no {previous} (run {start_from_stage} first or pass --init_from): starting from random init")
