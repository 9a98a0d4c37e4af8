"""The command line every stage shares: flags, `--config` presets, validation, and the model config they describe."""

import argparse
import json
import math
from pathlib import Path

import torch

from model import TinyMindConfig

from .errors import UserError

# Flags that shape the network, mapped straight onto TinyMindConfig fields.
MODEL_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha",
)


def add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model_type", choices=("dense", "moe"), default="dense", help="dense SwiGLU feed-forward, or Mixture-of-Experts")
    group.add_argument("--config", help="JSON preset in configs/ applied first; explicit flags override it")
    group.add_argument("--hidden_size", type=int, default=512, help="width of the residual stream")
    group.add_argument("--num_hidden_layers", type=int, default=8, help="decoder blocks")
    group.add_argument("--num_attention_heads", type=int, default=8, help="query heads")
    group.add_argument("--num_key_value_heads", type=int, default=2, help="key/value heads shared by groups of query heads")
    group.add_argument("--vocab_size", type=int, default=6400, help="embedding rows; at least the tokenizer's size")
    group.add_argument("--max_seq_len", type=int, default=512, help="tokens per training sample")
    group.add_argument("--n_routed_experts", type=int, default=4, help="MoE: experts the router chooses from")
    group.add_argument("--num_experts_per_tok", type=int, default=2, help="MoE: experts each token is sent to (top-k)")
    group.add_argument("--n_shared_experts", type=int, default=1, help="MoE: experts every token always goes through")
    group.add_argument("--aux_loss_alpha", type=float, default=0.1, help="MoE: weight of the load-balancing loss")
    group.add_argument("--tokenizer_path", help="tokenizer directory; model/tokenizer when not given")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="autocast dtype; bfloat16 on CUDA when supported, else float32")
    group.add_argument("--seed", type=int, default=42, help="seeds init, data order and sampling")
    group.add_argument("--out_dir", default="output", help="run folders go in here")


def add_training_flags(parser, default_data):
    group = parser.add_argument_group("training")
    group.add_argument("--data_path", default=default_data, help="training jsonl")
    group.add_argument("--skip_bad_lines", action="store_true",
                       help="drop malformed jsonl lines and report how many, instead of stopping at the first")
    group.add_argument("--epochs", type=int, default=1, help="passes over the data")
    group.add_argument("--max_steps", type=int, help="train exactly this many optimizer steps (overrides --epochs)")
    group.add_argument("--batch_size", type=int, default=32, help="samples per micro-batch (per process)")
    group.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate; cosine decay to a tenth of it")
    group.add_argument("--warmup_steps", type=int, help="linear warmup length; 2%% of the steps when not given")
    group.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay, on weight matrices only")
    group.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    group.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument("--log_interval", type=int, default=10, help="steps between CSV log rows")
    group.add_argument("--save_interval", type=int, default=500, help="save a checkpoint every N steps")
    group.add_argument("--keep_last", type=int, default=2, help="resume states kept in the run folder")
    group.add_argument("--save_format", choices=("pth", "safetensors"), default="pth")
    group.add_argument("--val_data", help="held-out jsonl whose perplexity is reported before and after training")
    group.add_argument("--val_samples", type=int, default=256, help="held-out samples used for that perplexity")
    group.add_argument("--init_from", help="start from these weights: a .pth or .safetensors file, a Hugging Face "
                       "directory, or an owner/name Hub repo id")
    group.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    group.add_argument("--fsdp", action="store_true", help="under torchrun: shard each block with FSDP2")
    group.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
    group.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute each block's activations in backward: less memory, about a third more time")


def parse(parser, argv=None):
    """Parse argv with any `--config` preset applied first, then check the values a user can get wrong."""
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_preset(known.config, parser))
    args = parser.parse_args(argv)
    if args.dtype is None:
        cuda_bf16 = args.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.dtype = "bfloat16" if cuda_bf16 else "float32"
    validate(args)
    return args


def load_preset(path, parser):
    """The preset's values for this parser's flags; keys no stage knows are an error, other stages' keys are skipped."""
    try:
        preset = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file (presets live in configs/)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--config {path}: not valid JSON ({err})") from None
    every_stage = new_parser("")
    add_model_flags(every_stage)
    add_training_flags(every_stage, default_data="")
    for key in preset:
        if key not in flag_names(every_stage) - {"help", "config"}:
            raise UserError(f"--config {path}: unknown key '{key}' (keys are flag names, see --help)")
    actions = {action.dest: action for action in parser._actions}
    return {key: preset_value(path, actions[key], value) for key, value in preset.items() if key in actions}


def preset_value(path, action, value):
    """A preset's value checked as the flag's own would be on the command line (argparse leaves defaults
    unchecked): a number, or a string that parses as one, for a number flag; one of the choices; true/false."""
    if value is None and action.default is None:  # "not given", as the flag itself allows
        return None
    checked = value
    if isinstance(action, argparse._StoreTrueAction):
        expected, ok = "true or false", isinstance(value, bool)
    elif action.choices is not None:
        expected, ok = " or ".join(map(json.dumps, action.choices)), value in action.choices
    elif action.type in (int, float):
        expected = "a whole number" if action.type is int else "a number"
        checked = as_number(action.type, value)
        ok = checked is not None
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise UserError(f"--config {path}: '{action.dest}' is {json.dumps(value)}, but --{action.dest} takes {expected}")
    return checked


def as_number(kind, value):
    """`value` (a JSON number, or a string as argparse would parse it) as a finite `kind`, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = kind(value) if isinstance(value, str) else value
        if not math.isfinite(number) or (kind is int and number != int(number)):
            return None
    except (ValueError, OverflowError):
        return None
    return kind(number)


def flag_names(parser):
    return {action.dest for action in parser._actions}


def validate(args):
    positive = ("hidden_size", "num_hidden_layers", "max_seq_len", "batch_size", "accumulation_steps",
                "epochs", "max_steps", "log_interval", "save_interval", "keep_last", "val_samples", "max_new_tokens")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    for name in ("learning_rate", "weight_decay", "grad_clip", "warmup_steps", "num_workers"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UserError(f"--{name} {value}: must not be negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    config = model_config(args)
    if args.max_seq_len > config.max_position_embeddings:
        raise UserError(
            f"--max_seq_len {args.max_seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
        )


def model_config(args) -> TinyMindConfig:
    """The TinyMindConfig the flags describe; an impossible shape is a UserError naming the flags."""
    try:
        return TinyMindConfig(use_moe=args.model_type == "moe", **{name: getattr(args, name) for name in MODEL_FIELDS})
    except ValueError as err:
        raise UserError(f"model flags: {err}") from None


def run_name(stage, args):
    """`pretrain_512_moe`: the stem every file of a run is named after (DESIGN.md checkpoint names)."""
    return f"{stage}_{args.hidden_size}{'_moe' if args.model_type == 'moe' else ''}"


def run_dir(stage, args) -> Path:
    return Path(args.out_dir) / f"{stage}_{args.model_type}"


def checkpoint_path(stage, args) -> Path:
    """The stage's weights file for these flags: the `.pth`, or the `.safetensors` when only that exists."""
    path = run_dir(stage, args) / f"{run_name(stage, args)}.pth"
    safetensors = path.with_suffix(".safetensors")
    return safetensors if safetensors.is_file() and not path.is_file() else path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the stage docstring's layout and shows each flag's default (unless it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def new_parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
