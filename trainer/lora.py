"""LoRA with `peft`: low-rank adapters on a frozen model, saved as a peft adapter folder and as merged weights.

The adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is peft's own format,
named after tinymind's module paths, which are Llama's: `PeftModel.from_pretrained` loads it onto
the stock Llama export of the base checkpoint as well as onto tinymind. The merged weights are an
ordinary checkpoint that every later stage, `3-eval.py` and `convert_hf` take.
"""

import contextlib
import copy
import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from model import atomic_folder, save_weights

from .distributed import say
from .errors import UserError
from .flags import check_ranges

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora_flags(parser):
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_rank", type=int, default=8, help="rank r of each adapter")
    group.add_argument("--lora_alpha", type=float, default=16, help="adapters are scaled by alpha / rank")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    group.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                       help="comma-separated module names (the last part of a module's path) that get adapters: "
                            "every projection of attention and feed-forward, routed and shared experts included")


def check_lora_flags(args):
    check_ranges(args, at_least_one=("lora_rank",), not_negative=("lora_alpha", "lora_dropout"))


def with_adapters(model, args):
    """`model` frozen, with fresh adapters on the target modules (peft initialises B to zero: no change yet)."""
    if args.fsdp:
        raise UserError("--fsdp: LoRA trains a few small matrices; run it under torchrun with DDP (drop --fsdp)")
    targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [name for name in targets if name not in names]
    if unknown or not targets:
        raise UserError(f"--lora_targets: no module named {unknown or targets} in this model "
                        f"(choose among {', '.join(LORA_TARGETS)})")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none")
    for moe in model.moe_layers():  # the routing bias is part of the frozen base: it stops moving
        moe.bias_rate = 0.0
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    say(f"LoRA rank {args.lora_rank} on {', '.join(targets)}: {trainable:,} trainable parameters of {total:,} "
        f"({100 * trainable / total:.2f}%); the base weights stay frozen")
    return peft_model


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers' deprecated `is_gradient_checkpointing`: a warning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merged(peft_model):
    """A copy of the base model with the adapters added into its weights."""
    return copy.deepcopy(peft_model).merge_and_unload()


def write_lora(model, state, paths):
    """The merged weights (what later stages read) and the adapter folder beside them."""
    base = merged(model)
    save_weights(base.state_dict(), base.config, paths.weights)
    save_adapter(model, adapter_dir(paths))


def adapter_dir(paths) -> Path:
    return paths.dir / paths.name


def save_adapter(peft_model, directory):
    """peft's `save_pretrained` into a temporary folder, then swapped in, so a crash keeps the previous one."""
    atomic_folder(directory, lambda tmp: peft_model.save_pretrained(str(tmp)))


def load_adapter(model, directory):
    """`model` with the adapter in `directory` applied on top, unmerged; a folder that is not one is one line."""
    if not (Path(directory) / "adapter_config.json").is_file():
        raise UserError(f"--lora {directory}: no adapter_config.json there (4-lora.py writes adapter folders "
                        f"as output/lora_{{type}}/lora_{{hidden}}[_moe]/)")
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(directory))
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"--lora {directory}: does not fit the checkpoint ({str(err).splitlines()[0]})") from None
