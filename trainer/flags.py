"""The command line every stage shares: flags, `--config` presets, validation, and the model config they describe."""

import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path

import torch

from model import TinyMindConfig
from model.generate import LEAST_REPETITION_PENALTY

from .distributed import say
from .tracking import tracker_names
from .errors import UserError

# The flags that shape the network. Each sets the TinyMindConfig field of its name, whose type and default it takes.
MODEL_FLAGS = {
    "hidden_size": "width of the residual stream",
    "num_hidden_layers": "decoder blocks",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads shared by groups of query heads",
    "vocab_size": "embedding rows; at least the tokenizer's size",
    "n_routed_experts": "MoE: experts the router chooses from",
    "num_experts_per_tok": "MoE: experts each token is sent to (top-k)",
    "n_shared_experts": "MoE: experts every token always goes through",
    "intermediate_size": "SwiGLU width of the feed-forward and of each expert (default: 64·ceil(8/3·hidden / 64))",
    "hidden_act": "the feed-forward's gate: silu (SwiGLU) or relu2 (ReLU², as nanochat; exports to transformers, not "
                  "GGUF)",
    "logit_softcap": "cap the logits at ±c smoothly, c·tanh(logits/c), as nanochat (0: off; such a model does not "
                     "export)",
    "value_embeds": "nanochat's value embeddings: every other block adds a per-token embedding of its own to the "
                    "attention's values, gated per head: true or false (such a model does not export)",
    "qk_norm": "a learned RMSNorm on every query and key head before the rotary (MiniMind-3, Qwen3): true or false",
    "rms_norm_eps": "epsilon of every RMSNorm",
    "rope_theta": "rotary base",
    "max_position_embeddings": "longest context the rotary tables are meant for",
    "norm_topk_prob": "MoE: divide the chosen experts' weights by their sum (at top-1: weight 1): true or false",
    "aux_loss_alpha": "MoE: weight of the load-balancing loss",
    "expert_bias_rate": "MoE: aux-loss-free balancing (DeepSeek-V3): a per-expert routing bias moved this much a step "
                        "towards even loads (0: off; 1e-3 is DeepSeek's; such a model does not export)",
    "seq_aux": "MoE: balance each sequence (true) or the whole batch at once (false)",
    "tie_word_embeddings": "the LM head is the token embedding (true) or a matrix of its own (false)",
    "dropout": "dropout probability on the embeddings, the attention weights and each block's outputs while training",
}


ADAMW_LEARNING_RATE = 5e-4  # AdamW's peak rate when a stage sets none (pretraining's Muon: PRETRAIN_DEFAULTS)


def boolean(text):
    """A flag's true/false value as JSON and most people spell it."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is neither true nor false")


def field_type(name):
    """The flag type of a TinyMindConfig field: its annotation, without the None of an optional one."""
    annotation = TinyMindConfig.__annotations__[name]
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    kind = options[0] if options else annotation
    return boolean if kind is bool else kind


def add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model_type", choices=("dense", "moe"), default="dense", help="dense SwiGLU feed-forward, or Mixture-of-Experts")
    group.add_argument("--config", help="JSON preset in configs/ applied first; explicit flags override it")
    config_fields = {field.name: field for field in dataclasses.fields(TinyMindConfig)}
    for name, help_text in MODEL_FLAGS.items():
        group.add_argument(f"--{name}", type=field_type(name), default=config_fields[name].default, help=help_text)
    group.add_argument("--yarn_factor", type=float, default=1.0,
                       help="YaRN: stretch the rotary to this many times --yarn_original_length, for inference past "
                            "the trained length (1: off)")
    group.add_argument("--yarn_original_length", type=int, default=2048, help="YaRN: the length the model was trained at")
    group.add_argument("--max_seq_len", type=int, default=512, help="tokens per training sample")
    group.add_argument("--tokenizer_path", help="tokenizer directory; model/tokenizer when not given")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="autocast dtype; on CUDA bfloat16 where the GPU computes it natively (Ampere on), else "
                            "float16 with a loss scaler to train and float32 to decode; float32 on a CPU")
    group.add_argument("--seed", type=int, default=42, help="seeds init, data order and sampling")
    group.add_argument("--out_dir", default="output", help="run folders go in here")


def add_training_flags(parser, default_data):
    group = parser.add_argument_group("training")
    group.add_argument("--data_path", default=default_data, help="training jsonl")
    group.add_argument("--skip_bad_lines", action="store_true",
                       help="drop malformed jsonl lines and report how many, instead of stopping at the first")
    group.add_argument("--pack", choices=("none", "isolated", "shared"), default="none",
                       help="put samples back to back in rows of --max_seq_len instead of padding each: isolated keeps "
                            "attention inside each sample, shared lets a row attend as one sequence")
    group.add_argument("--pack_fit", choices=("next", "best"), default="next",
                       help="how --pack fills rows with whole samples: next (in file order, a new row when the next "
                            "does not fit) or best (longest first, each into the fullest row it fits, as nanochat)")
    group.add_argument("--z_loss", type=float, default=0.0,
                       help="weight of the z-loss, the mean squared log-normaliser of the logits (PaLM used 1e-4; 0: off)")
    group.add_argument("--epochs", type=int, default=1, help="passes over the data")
    group.add_argument("--max_steps", type=int, help="train exactly this many optimizer steps (overrides --epochs)")
    group.add_argument("--batch_size", type=int, default=32, help="samples per micro-batch (per process)")
    group.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--learning_rate", type=float, default=ADAMW_LEARNING_RATE,
                       help="peak learning rate; decays to --final_lr_fraction of it")
    group.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                       help="adamw, or muon: Muon for the matrices inside the blocks, AdamW for embedding, head, norms "
                            "and routers")
    group.add_argument("--embedding_lr", type=float,
                       help="peak rate of the token embedding (and value embeddings), AdamW's (default: "
                            "--learning_rate; nanochat: 0.2 x (768 / hidden)^0.5)")
    group.add_argument("--head_lr", type=float,
                       help="peak rate of an untied LM head, AdamW's (default: --learning_rate; nanochat: "
                            "0.004 x (768 / hidden)^0.5)")
    group.add_argument("--muon_momentum", type=float, default=0.95,
                       help="Muon's momentum (Nesterov), torch.optim.Muon's default (nanochat: 0.85 rising to 0.95 "
                            "over its first 300 steps)")
    group.add_argument("--normuon", type=boolean, nargs="?", const=True, default=False,
                       help="NorMuon: each output neuron's row of Muon's update divided by the root of its running "
                            "mean square (decay 0.95), the update keeping its norm")
    group.add_argument("--polar_express", type=boolean, nargs="?", const=True, default=False,
                       help="orthogonalise Muon's update with Polar Express's five quintics (one of its own per "
                            "step, as nanochat) instead of torch.optim.Muon's one")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's first-moment decay (nanochat: 0.8)")
    group.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    group.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine",
                       help="after warmup: cosine decay, or warmup-stable-decay (flat, then linear over the last "
                            "--decay_fraction of the steps)")
    group.add_argument("--decay_fraction", type=float, default=0.2,
                       help="wsd: the share of the steps over which the rate falls to --final_lr_fraction of the peak "
                            "(nanochat: 0.65)")
    group.add_argument("--final_lr_fraction", type=float, default=0.1,
                       help="the rate at the last step, as a fraction of the peak (nanochat: 0)")
    group.add_argument("--warmup_steps", type=int, help="linear warmup length; 2%% of the steps when not given")
    group.add_argument("--weight_decay", type=float, default=0.1,
                       help="weight decay (AdamW's and Muon's), on weight matrices only")
    group.add_argument("--init", choices=("normal", "width"), default="normal",
                       help="a model from random init: every weight normal with std 0.02 (transformers'), or by "
                            "width as nanochat: the blocks' matrices and value embeddings uniform with std "
                            "1/sqrt(hidden_size), the embedding std 1, the untied head std 0.001")
    group.add_argument("--zero_init_out", action="store_true",
                       help="a model from random init starts its blocks' output projections (attention o_proj, "
                            "feed-forward down_proj) at zero, as nanochat: every block begins as the identity")
    group.add_argument("--bigram_steps", type=int, default=0,
                       help="a model from random init first fits its embedding, final norm and head to the training "
                            "data's bigram counts with this many full-batch steps, counted as training time "
                            "(0: off; pretraining: 40 in a plan of at most 200 steps, with --embedding_lr 0.003 "
                            "--head_lr 1e-3, unless one of the three is given)")
    group.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    group.add_argument("--num_workers", type=int,
                       help="DataLoader worker processes, which collate the next batches while the device trains "
                            "(default: 2 on CUDA, 0 elsewhere, where they would take the cores the step needs)")
    group.add_argument("--log_interval", type=int, default=10, help="steps between CSV log rows")
    group.add_argument("--save_interval", type=int, default=500, help="save a checkpoint every N steps")
    group.add_argument("--keep_last", type=int, default=2, help="resume states kept in the run folder")
    group.add_argument("--save_format", choices=("pth", "safetensors"), default="pth")
    group.add_argument("--val_data", help="held-out jsonl evaluated before and after training (pretraining and SFT: "
                       "perplexity and bits per byte)")
    group.add_argument("--eval_interval", type=int, help="also evaluate --val_data every N steps, into the CSV log's "
                       "val_* columns (default: before and after only)")
    group.add_argument("--val_samples", type=int, default=256, help="held-out samples used for that perplexity")
    group.add_argument("--eval_tasks", help="lm-eval tasks scored with the held-out figures, into the CSV log's val_* "
                       "columns (tinymind's own: tinymind_arithmetic, tinymind_idiom_meaning, ...; see 3-eval.py --tasks)")
    group.add_argument("--eval_limit", type=int, default=100, help="examples of each --eval_tasks task scored")
    group.add_argument("--report_to", type=tracker_names, default=(), metavar="{none,tensorboard,wandb,swanlab,trackio}",
                       help="mirror every CSV row to this tracker (or these, comma-separated) as the run goes (main "
                            "process only; offline where the tracker can be; the run keeps its id across --resume)")
    group.add_argument("--init_from", help="start from these weights: a .pth or .safetensors file, a Hugging Face "
                       "directory, or an owner/name Hub repo id")
    group.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    group.add_argument("--fsdp", action="store_true", help="under torchrun: shard each block with FSDP2")
    group.add_argument("--compile", type=boolean, nargs="?", const=True,
                       help="torch.compile the training forward and backward, batches padded to four widths so it "
                            "compiles once for each: true or false, alone true (default: true on CUDA, false "
                            "elsewhere and for GRPO; a forward that fails to compile says so in one line and training "
                            "goes on without it)")
    group.add_argument("--moe_dispatch", choices=("auto", "per_expert", "grouped"), default="auto",
                       help="how MoE layers run their experts: per_expert (one matmul each; their token counts read "
                            "back to the host), grouped (two grouped matmuls, nothing read back: one compiled graph), "
                            "auto (grouped on CUDA, per_expert elsewhere, where it measures faster)")
    group.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute each block's activations in backward: less memory, about a third more time")


def add_chat_flags(parser):
    group = parser.add_argument_group("chat")
    group.add_argument("--prompt", help="answer this once and exit")
    group.add_argument("--prompts_file", help="answer each line of this file")
    group.add_argument("--no_history", action="store_true", help="interactive chat forgets earlier turns")
    group.add_argument("--max_new_tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.6,
                       help="0 means greedy (the defaults here are measured: README, Chat defaults)")
    group.add_argument("--top_p", type=float, default=0.85)
    group.add_argument("--top_k", type=int, default=0, help="0 means no top-k cut")
    group.add_argument("--repetition_penalty", type=float, default=1.0)
    group.add_argument("--compile", dest="compile_decode", type=boolean, nargs="?", const=True, default=False,
                       help="decode through the compiled decode step (also for --tasks' generation): the first "
                            "answer waits some seconds while it compiles, the second prompt length once more; on "
                            "this project's 2-core CPU batch-1 decoding then ran 1.36-1.41x faster (README, Serving)")
    group.add_argument("--tools", help="tools the model may call: built-in names (calculator) and Python files of "
                       "functions, comma-separated")
    group.add_argument("--max_tool_calls", type=int, default=4, help="rounds of tool calls before the model must answer")
    group.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                       help="ask for thinking before the answer (--no-think: answer at once); default: the model's choice")
    group.add_argument("--ppl_data", help="report perplexity on this pretrain- or SFT-format jsonl instead")
    group.add_argument("--batch_size", type=int, default=8, help="batch size for --ppl_data")
    return group


def add_benchmark_flags(parser):
    group = parser.add_argument_group("benchmarks (lm-eval)")
    group.add_argument("--tasks", help="score the model on these lm-eval tasks, comma-separated (arc_easy, "
                       "ceval-valid, ... or tinymind's own: tinymind, or tinymind_idiom_meaning, ...)")
    group.add_argument("--num_fewshot", type=int, help="examples shown before each question (default: the task's)")
    group.add_argument("--limit", type=float, help="score at most this many examples per task (a fraction under 1)")
    group.add_argument("--include_path", help="a folder of your own task YAML files (tinymind's tasks/ always is)")
    group.add_argument("--chat_template", action="store_true",
                       help="wrap each question in the chat template (for chat models; lm-eval's apply_chat_template)")
    group.add_argument("--results", help="write lm-eval's results JSON here (default: beside the checkpoint)")
    return group


def every_flag_group():
    """Every flag group a program may have, the stages' own (each in its stage's module) included: a preset may
    hold keys of any of them."""
    from .grpo import add_grpo_flags
    from .lora import add_lora_flags
    from .objectives import add_distill_flags, add_dpo_flags

    return (add_model_flags, lambda parser: add_training_flags(parser, default_data=""), add_chat_flags,
            add_benchmark_flags,
            add_lora_flags, add_dpo_flags, add_grpo_flags, add_distill_flags)


def parse(parser, argv=None):
    """Parse argv with any `--config` preset applied first, then check the values a user can get wrong."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    known, _ = parser.parse_known_args(argv)
    preset = load_preset(known.config, parser) if known.config else {}
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    args.given_flags = set(preset) | given_on_command_line(parser, argv)
    if args.dtype is None:
        args.dtype = default_dtype(args.device, training=hasattr(args, "learning_rate"))  # the training flags: it trains
    cuda = args.device.startswith("cuda")
    if getattr(args, "compile", False) is None:
        args.compile = cuda
    if getattr(args, "num_workers", 0) is None:
        args.num_workers = 2 if cuda else 0
    validate(args)
    return args


def default_dtype(device, training):
    """bfloat16 autocast on a GPU that computes it natively (Ampere and later); on an older one (a T4, a V100, where
    torch emulates bfloat16, slower than float32) float16 with a loss scaler to train, float32 to decode and score (a
    model trained in bfloat16 may overflow float16's range); float32 on a CPU."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return "float32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float16" if training else "float32"


def given_on_command_line(parser, argv):
    """The destinations of the flags `argv` spells out: `argv` parsed again by a parser of the same flags
    whose every default is "absent"."""
    probe = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser.flags:
        probe.add_argument(*action.option_strings, dest=action.dest, **value_spec(action))
    return set(vars(probe.parse_known_args(argv)[0]))


def is_switch(action):
    """A flag that takes no value (store_true)."""
    return action.nargs == 0


def value_spec(action):
    """How `action` reads its value, as add_argument's keywords."""
    if is_switch(action):
        return {"action": "store_true"}
    return {"type": action.type, "choices": action.choices, "nargs": action.nargs, "const": action.const}


def load_preset(path, parser):
    """The preset's values for this parser's flags, each parsed by the flag itself as on the command line.
    Keys no stage knows are an error; keys of other stages are skipped."""
    try:
        preset = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file (presets live in configs/)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--config {path}: not valid JSON ({err})") from None
    actions = {action.dest: action for action in parser.flags}
    known = set(actions) - {"config"}  # this program's flags, a stage's own included, and every stage's below
    for add_flags in every_flag_group():
        every_stage = new_parser("", add_help=False)
        add_flags(every_stage)
        known |= {action.dest for action in every_stage.flags} - {"config"}
    values = {}
    for key, value in preset.items():
        if key not in known:
            raise UserError(f"--config {path}: unknown key '{key}' (keys are flag names, see --help)")
        if key in actions:
            values[key] = preset_value(path, actions[key], value, parser)
    return values


def preset_value(path, action, value, parser):
    """`value` as `--{key} value` on the command line would give it; null means "not given" where the flag
    allows that. A value the flag refuses is one line naming the key and what the flag takes."""
    if is_switch(action):
        ok, argv = isinstance(value, bool), [action.option_strings[0]] if value is True else []
    elif value is None:
        ok, argv = action.default is None, []
    elif action.type is boolean:
        ok, argv = isinstance(value, bool), [action.option_strings[0], str(value)]
    else:
        ok, argv = not isinstance(value, (bool, list, dict)), [action.option_strings[0], str(value)]
    if ok:
        alone = new_parser("", add_help=False)  # this flag alone: no other flag's requirement can interfere
        alone.add_argument(*action.option_strings, dest=action.dest, default=action.default, **value_spec(action))
        try:
            return getattr(alone.parse_args(argv, argparse.Namespace()), action.dest, value)
        except UserError:
            pass
    raise UserError(f"--config {path}: '{action.dest}' is {json.dumps(value)}, but --{action.dest} takes "
                    f"{flag_takes(action)}")


def flag_takes(action):
    if is_switch(action) or action.type is boolean:
        return "true or false"
    if action.choices is not None:
        return " or ".join(map(json.dumps, action.choices))
    return {int: "a whole number", float: "a number"}.get(action.type, "a string")


def check_ranges(args, at_least_one=(), not_negative=()):
    """The flags named (those this program has and were set) hold a whole count of at least 1, or a value not
    below 0; else one line naming the flag. Shared by `validate` and the stages' own checks."""
    for names, lowest, words in ((at_least_one, 1, "must be at least 1"), (not_negative, 0, "must not be negative")):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and value < lowest:
                raise UserError(f"--{name} {value}: {words}")


def validate(args):
    check_ranges(args, at_least_one=("hidden_size", "num_hidden_layers", "max_seq_len", "batch_size",
                                     "accumulation_steps", "epochs", "max_steps", "log_interval", "save_interval",
                                     "keep_last", "val_samples", "max_new_tokens", "yarn_original_length",
                                     "eval_interval"),
                 not_negative=("learning_rate", "embedding_lr", "head_lr", "weight_decay", "grad_clip", "warmup_steps",
                               "num_workers", "temperature", "bigram_steps"))
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} {value}: must be a finite number")
    if not 0 <= getattr(args, "muon_momentum", 0) < 1:
        raise UserError(f"--muon_momentum {args.muon_momentum}: must be at least 0 and below 1 (default 0.95)")
    if getattr(args, "optimizer", None) == "muon" and args.fsdp:
        if "optimizer" in args.given_flags:
            raise UserError("--optimizer muon with --fsdp: Muon orthogonalises whole matrices, which FSDP2 shards; "
                            "train under torchrun without --fsdp (DDP)")
        args.optimizer = "adamw"
        if "learning_rate" not in args.given_flags:
            args.learning_rate = ADAMW_LEARNING_RATE
        say(f"note: --fsdp: AdamW at lr {args.learning_rate:g} instead of the default Muon (Muon orthogonalises "
            "whole matrices, which FSDP2 shards)", err=True)
    if (getattr(args, "optimizer", None) == "adamw" and "optimizer" in args.given_flags
            and "learning_rate" not in args.given_flags and args.learning_rate != ADAMW_LEARNING_RATE):
        say(f"note: --optimizer adamw: AdamW at lr {ADAMW_LEARNING_RATE:g}, not this stage's {args.learning_rate:g} "
            "(Muon's); pass --learning_rate to choose", err=True)
        args.learning_rate = ADAMW_LEARNING_RATE
    for flag, what in (("normuon", "NorMuon normalises"), ("polar_express", "Polar Express orthogonalises"),
                       ("muon_momentum", "it sets the momentum of")):
        if (getattr(args, flag, False) and args.optimizer != "muon"
                and (flag != "muon_momentum" or flag in args.given_flags)):
            raise UserError(f"--{flag}: {what} Muon's update and this run's optimizer is {args.optimizer}; "
                            "pass --optimizer muon (without --fsdp)")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout}: must lie in [0, 1)")
    if (hasattr(args, "learning_rate") and args.model_type == "moe" and args.num_experts_per_tok == 1
            and args.norm_topk_prob and not args.aux_loss_alpha):
        say("note: top-1 routing with --norm_topk_prob true gives the chosen expert a weight of exactly 1, so "
            "without --aux_loss_alpha the router learns nothing; pass --norm_topk_prob false or an aux loss",
            err=True)
    if not 0 < getattr(args, "decay_fraction", 0.5) <= 1:
        raise UserError(f"--decay_fraction {args.decay_fraction}: must lie in (0, 1]")
    if not 0 <= getattr(args, "final_lr_fraction", 0) <= 1:
        raise UserError(f"--final_lr_fraction {args.final_lr_fraction}: must lie in [0, 1] (default 0.1)")
    for beta in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, beta, 0.5) < 1:
            raise UserError(f"--{beta} {getattr(args, beta)}: must lie in [0, 1)")
    if args.yarn_factor < 1:
        raise UserError(f"--yarn_factor {args.yarn_factor}: must be at least 1 (1 is off)")
    if getattr(args, "repetition_penalty", 1.0) < LEAST_REPETITION_PENALTY:
        raise UserError(f"--repetition_penalty {args.repetition_penalty}: must be at least "
                        f"{LEAST_REPETITION_PENALTY:g} (1 is off)")
    if getattr(args, "top_p", 1.0) is not None and not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise UserError(f"--top_p {args.top_p}: must lie in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    config = model_config(args)
    if args.max_seq_len > config.max_position_embeddings:
        raise UserError(
            f"--max_seq_len {args.max_seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
        )


def model_config(args) -> TinyMindConfig:
    """The TinyMindConfig the flags describe; an impossible shape is a UserError naming the flags."""
    return checked_config(flagged_fields(args))


def flagged_fields(args, names=None) -> dict:
    """The config fields the flags `names` (default: all) set."""
    names = set(MODEL_FLAGS) | {"model_type", "yarn_factor"} if names is None else names
    fields = {name: getattr(args, name) for name in MODEL_FLAGS if name in names}
    if "model_type" in names:
        fields["use_moe"] = args.model_type == "moe"
    if "yarn_factor" in names or "yarn_original_length" in names:
        fields["rope_scaling"] = (None if args.yarn_factor == 1 else
                                  TinyMindConfig.yarn(args.yarn_factor, args.yarn_original_length))
    return fields


def flag_overrides(args) -> dict:
    """The config fields of the model flags given on the command line or in the preset: applied over a
    checkpoint's own config, what the user spelled out wins and the rest stays as the weights were trained."""
    return flagged_fields(args, getattr(args, "given_flags", set()))


def checked_config(fields) -> TinyMindConfig:
    try:
        return TinyMindConfig.from_dict(fields)
    except ValueError as err:
        raise UserError(f"model flags: {err}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the stage docstring's layout and shows each flag's default (unless it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is a UserError: one `error:` line and exit code 2, like every other mistake. It keeps the
    flags it was given (`flags`: their actions, groups' too) for the presets' checks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags = []

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.dest != "help":
            self.flags.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add_to_group = group.add_argument

        def add_argument(*flag_args, **flag_kwargs):
            action = add_to_group(*flag_args, **flag_kwargs)
            self.flags.append(action)
            return action

        group.add_argument = add_argument
        return group

    def error(self, message):
        raise UserError(message)


def new_parser(description, add_help=True):
    return ArgumentParser(description=description, formatter_class=HelpFormatter, add_help=add_help)
