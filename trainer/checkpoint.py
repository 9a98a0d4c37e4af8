"""Runs on disk: every path of a run, atomic writes, weights in and out, and the resume state.

A checkpoint is data, not code: `.pth` files are read with `weights_only=True` and
`.safetensors` through safetensors, so a file carrying pickled objects is refused.
Changed bytes are caught before loading: a `.pth` is a zip whose entries carry CRC-32s
(torch.load never checks them; `zipfile` does), and the `.safetensors` written here carry a
SHA-256 of their tensors in the header (`tinymind.sha256`).
Every write goes to a temporary file that is renamed over the target, so a crash or a
full disk at any instant leaves the previous complete file readable.

A save writes the weights (`.pth` or `.safetensors` + config JSON, what later stages read)
and a resume state: the trainer's `state_dict()` (weights, optimizer, progress, RNG
states, the objective's own state, the flags that must not change), from which
`--resume` continues bit-exactly.
"""

import hashlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dataset import LENGTH_GROUP_STEPS
from model import TinyMindConfig, TinyMindForCausalLM
from model.convert import UnsupportedArchitecture, load_hf, names_hf_model

from . import distributed
from .distributed import say
from .errors import UserError
from .flags import MODEL_FLAGS, config_with_flags, model_config

# Flags a resumed run must share with the run that wrote the state, or the continuation is not the same run.
# The batch flags must match too when the process count is the same; across process counts, the global batch.
SAME_RUN_FLAGS = ("model_type", *MODEL_FLAGS, "max_seq_len", "seed", "optimizer")
BATCH_FLAGS = ("batch_size", "accumulation_steps")
RESUME_FLAGS = SAME_RUN_FLAGS + BATCH_FLAGS


@dataclass(frozen=True)
class RunPaths:
    """Every file of one run: `{out_dir}/{stage}_{model_type}/{stage}_{hidden}[_moe]{suffix}`."""

    dir: Path
    name: str  # e.g. pretrain_512_moe
    save_format: str = "pth"

    @property
    def weights(self) -> Path:
        return self.dir / f"{self.name}.{self.save_format}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}_log.csv"

    def resume_state(self, step) -> Path:
        return self.dir / f"{self.name}_resume_{step:08d}.pt"

    def resume_states(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}_resume_*.pt"))

    def existing_weights(self) -> Path:
        """The weights a later stage reads: the `.pth`, or the `.safetensors` when only that exists."""
        pth = self.dir / f"{self.name}.pth"
        safetensors = pth.with_suffix(".safetensors")
        return safetensors if safetensors.is_file() and not pth.is_file() else pth


def run_paths(stage, args) -> RunPaths:
    moe = args.model_type == "moe"
    return RunPaths(Path(args.out_dir) / f"{stage}_{args.model_type}", f"{stage}_{args.hidden_size}{'_moe' * moe}",
                    getattr(args, "save_format", "pth"))


def prepare_run_dir(paths, args):
    """Check that the run folder is writable, that --resume has a state there to continue, and that a fresh
    run would not overwrite an earlier one's. Stages call it first (on the main process), so a wrong folder
    fails before the data is tokenized."""
    earlier = paths.resume_states()
    if args.resume and not earlier:
        raise no_resume_state(paths)
    if earlier and not args.resume:
        raise UserError(
            f"{paths.dir} holds an earlier {paths.name} run (up to step {int(earlier[-1].stem.rsplit('_', 1)[1])}): "
            f"pass --resume to continue it, or move that folder away (or pick another --out_dir) to start afresh"
        )
    try:
        paths.dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=paths.dir).close()
    except OSError as err:
        raise UserError(f"--out_dir {args.out_dir}: cannot write to {paths.dir} ({err.strerror})") from None


def no_resume_state(paths):
    return UserError(f"--resume: no resume state ({paths.name}_resume_*.pt) in {paths.dir}; run without --resume")


def save_run(trainer, keep_last):
    """Weights + config, then the resume state; older resume states beyond `keep_last` are removed.
    Every process calls it (FSDP gathers shards); the main process writes."""
    state = trainer.state_dict()
    paths = trainer.paths

    def write():
        paths.dir.mkdir(parents=True, exist_ok=True)
        trainer.write_weights(trainer.raw_model, state["model"], paths)
        atomic_write(paths.resume_state(state["progress"]["step"]), lambda tmp: torch.save(state, tmp))
        for old in paths.resume_states()[:-keep_last]:
            old.unlink(missing_ok=True)

    distributed.main_process_alone(write)


def write_weights(model, state, paths):
    """The weights later stages read: the model's state dict and config (a stage may write more, see LoRA)."""
    save_weights(state, model.config, paths.weights)


def read_resume_state(paths):
    """(path, state) of the newest readable resume state (one cut off by a crash falls back to the one before)."""
    states = paths.resume_states()
    if not states:
        raise no_resume_state(paths)
    for path in reversed(states):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as err:
            say(f"warning: {path} is unreadable ({type(err).__name__}); trying the previous state", err=True)
    else:
        raise UserError(f"--resume: every resume state in {paths.dir} is unreadable; run without --resume")
    saved_order = state.get("data_order")
    if saved_order != LENGTH_GROUP_STEPS:  # its data position may count into another order than this epoch's
        reason = ("does not record its data order" if saved_order is None
                  else f"was written with another data order (length groups of {saved_order} steps)")
        say(f"warning: {path.name} {reason}; the rest of this epoch may repeat some samples and skip others",
            err=True)
    return path, state


def check_resume_flags(state, args, world_size, paths):
    """The flags of this run must continue the saved one; else one line naming the flag and its value."""
    saved, saved_world_size = state["flags"], state["world_size"]
    for name in SAME_RUN_FLAGS + (BATCH_FLAGS if saved_world_size == world_size else ()):
        if name in saved and getattr(args, name) != saved[name]:
            raise UserError(f"--resume: --{name} is {getattr(args, name)} but the run in {paths.dir} used "
                            f"{saved[name]}; pass --{name} {saved[name]} or start a new run without --resume")
    samples_per_step = args.batch_size * args.accumulation_steps * world_size
    saved_global = saved["batch_size"] * saved["accumulation_steps"] * saved_world_size
    if samples_per_step != saved_global:
        raise UserError(
            f"--resume: --batch_size × --accumulation_steps × processes is {samples_per_step} but the run in "
            f"{paths.dir} used {saved_global} ({saved_world_size} processes); choose flags that give {saved_global}"
        )


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.getstate() round-trips through torch.save as lists; setstate wants tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def atomic_write(path, write):
    """Call `write(tmp_path)` and rename the result over `path`; on failure remove the partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {err.strerror or err}; the previous file there is untouched") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def config_path(weights_path) -> Path:
    """The model config written beside a weights file: `sft_512.pth` → `sft_512.json`."""
    return Path(weights_path).with_suffix(".json")


def save_weights(state_dict, config, path):
    """Write a state dict (the layout in docs/architecture.md) to `path`, safetensors for a `.safetensors` name and torch.save
    otherwise, plus the model config beside it."""
    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    if path.suffix == ".safetensors":
        if config.tie_word_embeddings:
            # safetensors refuses tensors that share memory; the tied head is rebuilt from the embedding on load.
            state.pop("lm_head.weight", None)
        metadata = {DIGEST_KEY: tensors_digest(state)}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(config_path(path), lambda tmp: config.to_json_file(tmp))


def read_state_dict(path) -> dict:
    """Tensors from a `.pth` or `.safetensors` file; a missing, corrupt or pickled file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
            check_digest(path, state)
        else:
            check_zip_checksums(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not refused:
            raise UserError(f"{path}: truncated or corrupt checkpoint (not a readable torch file)") from None
        raise UserError(
            f"{path}: refused, it holds pickled Python objects ({refused.group(1)}), not only tensors; "
            "load it in a trusted session and re-save `model.state_dict()`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, SafetensorError, ValueError, OSError, IndexError,
            KeyError) as err:  # a download cut short fails in any of these, depending on where it was cut
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors (a resume state? pass the .pth weights file)")
    return state


DIGEST_KEY = "tinymind.sha256"


def tensors_digest(state) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digest(path, state):
    with safe_open(str(path), "pt") as f:
        expected = (f.metadata() or {}).get(DIGEST_KEY)
    if expected is not None and tensors_digest(state) != expected:
        raise UserError(f"{path}: corrupt checkpoint (its tensors no longer match the SHA-256 written with them: "
                        "bytes changed after it was saved); copy or download it again")


def check_zip_checksums(path):
    """A torch.save file is a zip: compare every entry with its stored CRC-32 (a file of the old, non-zip
    format has none to compare)."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise UserError(f"{path}: corrupt checkpoint ({bad} does not match its stored CRC-32: bytes changed after it "
                        "was saved); copy or download it again")


def load_into(model, state, source):
    """Strictly load `state` into `model`, or name the first mismatching keys and the flags that fix them."""
    own = model.state_dict()
    if model.config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    reshaped = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"missing {missing[:3]}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:3]}")
        if reshaped:
            key = reshaped[0]
            problems.append(f"{key} is {list(state[key].shape)} there but {list(own[key].shape)} here")
        hint = config_path(source)
        hint = f" (its shape is in {hint})" if hint.is_file() else ""
        raise UserError(
            f"{source} does not fit this model: {'; '.join(problems)}. Pass the --model_type, --hidden_size, "
            f"--num_hidden_layers and expert flags of the run that wrote it{hint}"
        )
    model.load_state_dict(state, strict=True)


def load_model(path, fallback_config: TinyMindConfig | None = None) -> TinyMindForCausalLM:
    """A ready model from a `.pth`/`.safetensors` (config from the JSON beside it, else `fallback_config`)
    or from a Hugging Face directory or repo id (tinymind, Llama, Mixtral or Qwen2-MoE; see model/convert.py)."""
    path = Path(path)
    if names_hf_model(path):
        try:
            return load_hf(str(path))
        except UnsupportedArchitecture as err:
            raise UserError(f"{path}: {err}") from None
        except OSError as err:  # a missing directory, or a repo id that cannot be fetched
            raise UserError(f"{path}: cannot load it ({' '.join(str(err).split())})") from None
    config_file = config_path(path)
    if config_file.is_file():
        config = TinyMindConfig.from_json_file(config_file)
    elif fallback_config is not None:
        config = fallback_config
    else:
        raise UserError(f"{path}: no {config_file.name} beside it; give the model shape with flags or --config")
    model = TinyMindForCausalLM(config)
    load_into(model, read_state_dict(path), path)
    return model


def load_model_as_flagged(path, args) -> TinyMindForCausalLM:
    """`load_model` with the model flags given on the command line or in a preset applied over the checkpoint's
    own config (its shape for a bare `.pth`, `--yarn_factor` at inference); the weights must still fit."""
    loaded = load_model(path, fallback_config=model_config(args))
    config = config_with_flags(loaded.config, args)
    if config.to_dict() == loaded.config.to_dict():
        return loaded
    model = TinyMindForCausalLM(config)
    load_into(model, loaded.state_dict(), path)
    return model
