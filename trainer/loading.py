"""One way to load a model for use (chat, serving, sampling, a frozen reference or teacher, a stage's start):
a path, config overrides, an optional LoRA adapter and a device give back the model and its tokenizer."""

from dataset import load_tokenizer, tokenizer_beside
from model import load_model

from .distributed import say
from .errors import UserError
from .flags import flag_overrides, model_config
from .lora import load_adapter
from .run_folder import run_paths


def load_for_use(path, overrides=None, adapter=None, device="cpu", tokenizer_path=None, shape=None):
    """(model in eval mode on `device`, tokenizer): the weights at `path` (see model.load_model for `overrides`
    and `shape`), with the LoRA adapter folder `adapter` applied unmerged, and the tokenizer at
    `tokenizer_path` (default: the one saved with the weights, else the project's), which must fit the model's
    vocabulary."""
    model = load_model(path, overrides, shape)
    tokenizer = load_tokenizer(tokenizer_path or tokenizer_beside(path))
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{path} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer has "
                        f"{len(tokenizer)}; pass the --tokenizer_path it was trained with")
    if adapter:
        model = load_adapter(model, adapter).get_base_model()  # the adapters in its modules, unmerged
    return model.to(device).eval(), tokenizer


def load_flagged(path, args):
    """The weights at `path` with the model flags given on the command line or in a preset applied over their
    own config (for a bare `.pth`, the flags are its shape): what a stage starts from and, frozen, its
    reference, so both are one model."""
    return load_model(path, flag_overrides(args), model_config(args))


def add_checkpoint_flags(group, what="the model to load"):
    group.add_argument("--checkpoint", help=f"{what}: a .pth/.safetensors or a Hugging Face directory "
                                            "(default: the matching output/sft_*/sft_*.pth)")
    group.add_argument("--lora", help="a LoRA adapter folder (4-lora.py's) to apply to the checkpoint, unmerged")


def load_checkpoint_flags(args):
    """(model, tokenizer, path) for the --checkpoint and --lora flags and the model flags."""
    path = args.checkpoint or run_paths("sft", args).existing_weights()
    model, tokenizer = load_for_use(path, flag_overrides(args), args.lora, args.device, args.tokenizer_path,
                                    shape=model_config(args))
    say(f"loaded {path} ({model.parameter_counts()[0] / 1e6:.2f}M parameters)"
        + (f" with the LoRA adapter in {args.lora}" if args.lora else "")
        + f"; tokenizer {tokenizer.name_or_path}", err=True)
    return model, tokenizer, path
