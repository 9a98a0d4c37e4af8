"""Move a tinymind checkpoint to and from a Hugging Face directory that stock tools run.

    python -m scripts.convert_hf export --checkpoint output/sft_dense/sft_512.pth --out hf/sft_512
    python -m scripts.convert_hf import --model hf/sft_512 --out output/imported/sft_512.pth
    python -m scripts.convert_hf gguf --checkpoint output/sft_dense/sft_512.pth --out gguf/sft_512.gguf --dtype f16

Export writes safetensors, config and tokenizer (chat template included) that
`AutoModelForCausalLM.from_pretrained(DIR)` loads without trust_remote_code: a dense model as
LlamaForCausalLM or Qwen3ForCausalLM, a MoE as MixtralForCausalLM, Qwen2MoeForCausalLM or
Qwen3MoeForCausalLM (model/convert.py says which, why and how exactly).
Import reads such a directory (or a tinymind one) and writes the .pth, its .json config and its tokenizer/.
gguf writes one file llama.cpp runs (`llama-cli -m FILE`), tokenizer and chat template inside, and an
ollama `Modelfile` beside it (`ollama create NAME -f Modelfile`); model/gguf_export.py says which
llama.cpp architecture each model becomes.
"""

import argparse
from pathlib import Path

import torch

from dataset import load_tokenizer, same_tokenizer, save_tokenizer, tokenizer_beside
from model import TinyMindConfig, atomic_folder, atomic_write, save_weights
from model.convert import UnsupportedArchitecture, export_hf
from model.gguf_export import DTYPES, architecture, modelfile, ollama_template, write_gguf
from trainer import UserError, load_for_use, run_cli
from trainer.distributed import say


# Written into every export: the one kind of folder with files in it that an export replaces.
EXPORT_MARKER = ".tinymind_export"


def export(args):
    model, tokenizer = load_for_use(args.checkpoint, tokenizer_path=args.tokenizer_path, shape=read_config(args.config))
    dtype = getattr(torch, args.dtype) if args.dtype else model.weights_dtype
    written = {}

    def write(folder):  # into a folder swapped in whole: no mix with an earlier export, nothing half written
        written["architecture"] = export_hf(model, folder, dtype=dtype)
        tokenizer.save_pretrained(folder)
        (folder / EXPORT_MARKER).write_text(f"exported from {args.checkpoint} by scripts/convert_hf.py, whose next "
                                            "export here replaces this folder whole\n")
    out = Path(args.out).resolve()
    check_out(args.out, out, [Path(args.checkpoint), Path(tokenizer.name_or_path)])
    try:
        atomic_folder(out, write)
    except UnsupportedArchitecture as err:
        raise UserError(f"{args.checkpoint}: {err}") from None
    say(f"wrote {args.out} ({written['architecture']})")


def check_out(name, out, sources):
    """Refuse an --out whose replacement would lose what is not an export's: a file, a folder holding (or inside)
    the checkpoint or tokenizer being read, or a folder of files that no earlier export wrote."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {name}: a file is there and an export writes a folder; give a new or empty one")
    for source in (source.resolve() for source in sources if source.exists()):
        if out == source or out in source.parents or (source.is_dir() and source in out.parents):
            raise UserError(f"--out {name}: the export would replace or write into {source}, which it reads; give a "
                            "folder of its own")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise UserError(f"--out {name}: the folder holds files and no earlier export (no {EXPORT_MARKER}); an export "
                        "replaces its folder whole, so give a new or empty one")


def to_gguf(args):
    model, tokenizer = load_for_use(args.checkpoint, tokenizer_path=args.tokenizer_path, shape=read_config(args.config))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda tmp: write_gguf(model, tokenizer, tokenizer.name_or_path, tmp, args.dtype))
    except UnsupportedArchitecture as err:
        raise UserError(f"{args.checkpoint}: {err}") from None
    recipe = out.with_name("Modelfile")
    atomic_write(recipe, lambda tmp: tmp.write_text(modelfile(tokenizer, out.name)))
    say(f"wrote {out} ({architecture(model.config)}, {args.dtype}, {out.stat().st_size / 1e6:.1f} MB) and {recipe} "
        f"(its chat template: {ollama_template(tokenizer)[1]})")


def read_config(path):
    if path is None:
        return None
    try:
        return TinyMindConfig.from_json_file(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable model config ({err}); pass the .json the trainer wrote") from None


def import_(args):
    """The weights and config, and beside them the tokenizer they were trained with (which every later load
    takes from there), or none is written."""
    model, tokenizer = load_for_use(args.model, tokenizer_path=args.tokenizer_path)
    if args.tokenizer_path is None and tokenizer_beside(args.model) is None:  # not the project's in its place
        raise UserError(f"{args.model} holds no tokenizer.json; pass --tokenizer_path with the tokenizer its weights "
                        "were trained with")
    out = Path(args.out)
    saved = out.parent / "tokenizer"
    if tokenizer_beside(out) is not None and not same_tokenizer(load_tokenizer(saved), tokenizer):
        raise UserError(f"{saved} holds another tokenizer, the one of the weights already there; give --out a folder "
                        "of its own")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), model.config, out)
    save_tokenizer(tokenizer, saved)
    say(f"wrote {out}, {out.with_suffix('.json')} and {saved} ({tokenizer.name_or_path}, {len(tokenizer):,} tokens)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    to_hf = commands.add_parser("export", help="tinymind .pth → Hugging Face directory")
    to_hf.add_argument("--checkpoint", required=True, help=".pth or .safetensors weights")
    to_hf.add_argument("--out", required=True, help="directory to write: a new or empty one, or an earlier export, "
                                                     "which it replaces whole")
    to_hf.add_argument("--config", help="model config JSON, for a checkpoint without one beside it")
    to_hf.add_argument("--tokenizer_path", help="tokenizer directory copied alongside (default: the one saved with "
                                                "the checkpoint, else model/tokenizer)")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="weight dtype written (default: the one the checkpoint's weights are stored in)")
    to_hf.set_defaults(run=export)

    from_hf = commands.add_parser("import", help="Hugging Face directory or repo id → tinymind .pth")
    from_hf.add_argument("--model", required=True, help="Hugging Face directory or owner/name repo id")
    from_hf.add_argument("--out", required=True, help=".pth to write (its .json config and tokenizer/ go beside it)")
    from_hf.add_argument("--tokenizer_path", help="tokenizer directory saved beside the weights (default: the "
                                                  "model's own tokenizer.json)")
    from_hf.set_defaults(run=import_)

    to_gguf_file = commands.add_parser("gguf", help="tinymind .pth → one GGUF file for llama.cpp / ollama")
    to_gguf_file.add_argument("--checkpoint", required=True, help=".pth or .safetensors weights")
    to_gguf_file.add_argument("--out", required=True, help="the .gguf to write (a Modelfile goes beside it)")
    to_gguf_file.add_argument("--config", help="model config JSON, for a checkpoint without one beside it")
    to_gguf_file.add_argument("--tokenizer_path", help="tokenizer directory embedded (default: the one saved with "
                                                       "the checkpoint, else model/tokenizer)")
    to_gguf_file.add_argument("--dtype", choices=tuple(DTYPES), default="f16",
                              help="weight type: f32, f16, or q8_0 (8-bit blocks); norms and routers stay f32")
    to_gguf_file.set_defaults(run=to_gguf)

    args = parser.parse_args(argv)
    run_cli(lambda: args.run(args))


if __name__ == "__main__":
    main()
