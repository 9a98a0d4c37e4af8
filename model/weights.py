"""Weights on disk: atomic writes, the config beside the weights, corruption checks, and loading a model.

A checkpoint is data, not code: `.pth` files are read with `weights_only=True` and
`.safetensors` through safetensors, so a file carrying pickled objects is refused.
Changed bytes are caught before loading: a `.pth` is a zip whose entries carry CRC-32s
(torch.load never checks them; `zipfile` does), and the `.safetensors` written here carry a
SHA-256 of their tensors in the header (`tinymind.sha256`).
Every write goes to a temporary file that is renamed over the target, so a crash or a
full disk at any instant leaves the previous complete file readable.

Every mistake a user can make with a file (missing, corrupt, the wrong shape) is a `CheckpointError`
whose message names the file and the fix; the stage scripts print it as one `error:` line.
"""

import hashlib
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import TinyMindConfig
from .convert import WEIGHT_SUFFIXES, UnsupportedArchitecture, load_hf, names_hf_model
from .model import TinyMindForCausalLM


class CheckpointError(Exception):
    """A weights file that cannot be read, written or loaded into the model asked for."""


# What a write cut short raises (a full disk, a vanished folder): OSError from plain files, SafetensorError from
# safetensors, RuntimeError from torch.save's zip writer.
WRITE_FAILURES = (OSError, SafetensorError, RuntimeError)


def write_failure(target, err, what) -> CheckpointError:
    """One line for a failed write, whichever writer failed (an OSError's strerror, else its message)."""
    reason = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
    return CheckpointError(f"could not write {target}: {reason}; the previous {what} there is untouched")


def atomic_write(path, write):
    """Call `write(tmp_path)` and rename the result over `path`; on failure remove the partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, WRITE_FAILURES):
            raise write_failure(path, err, "file") from None
        raise


def atomic_folder(directory, write):
    """Call `write(tmp_folder)` and swap the result in for the folder `directory`: a crash or a failed write leaves
    the previous folder whole (a crash between the two renames leaves it as `.NAME.old` beside, which the next call
    puts back before anything else)."""
    directory = Path(directory)
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")

    def put_back():
        if old.exists() and not directory.exists():
            os.replace(old, directory)
    put_back()
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write(tmp)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        put_back()
        if isinstance(err, WRITE_FAILURES):
            raise write_failure(directory, err, "folder") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def config_path(weights_path) -> Path:
    """The model config written beside a weights file: `sft_512.pth` → `sft_512.json`."""
    return Path(weights_path).with_suffix(".json")


def save_weights(state_dict, config, path):
    """Write a state dict (the layout in docs/architecture.md) to `path`, safetensors for a `.safetensors` name
    and torch.save otherwise, plus the model config beside it."""
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
    """Tensors from a `.pth` or `.safetensors` file; a missing, corrupt or pickled file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
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
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (not a readable torch file)") from None
        raise CheckpointError(
            f"{path}: refused, it holds pickled Python objects ({refused.group(1)}), not only tensors; "
            "load it in a trusted session and re-save `model.state_dict()`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, SafetensorError, ValueError, OSError, IndexError,
            KeyError) as err:  # a download cut short fails in any of these, depending on where it was cut
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (a resume state? pass the .pth weights file)")
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
        raise CheckpointError(f"{path}: corrupt checkpoint (its tensors no longer match the SHA-256 written with "
                              "them: bytes changed after it was saved); copy or download it again")


def check_zip_checksums(path):
    """A torch.save file is a zip: compare every entry with its stored CRC-32 (a file of the old, non-zip
    format has none to compare)."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint ({bad} does not match its stored CRC-32: bytes changed "
                              "after it was saved); copy or download it again")


EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def with_head(model, state, source) -> dict:
    """`state` with the head that a tied `.safetensors` leaves out taken from the embedding (whether or not the
    model ties them). A tied model refuses a head of its own: loading both into the one tensor would silently
    replace the embedding with the head."""
    if EMBEDDING not in state:
        return state
    if HEAD not in state:
        return {**state, HEAD: state[EMBEDDING]}
    if model.config.tie_word_embeddings and not torch.equal(state[HEAD], state[EMBEDDING]):
        raise CheckpointError(f"{source} has an untied head (its lm_head differs from its embedding) but the model "
                              "asked for ties them; drop the tie_word_embeddings override (pass "
                              "--tie_word_embeddings false, also over a preset that ties them)")
    return state


def load_into(model, state, source):
    """Strictly load `state` into `model`, or name the first mismatching keys and the flags that fix them."""
    own = model.state_dict()
    state = with_head(model, state, source)
    # A model that balances its experts by a routing bias starts from weights without one at a bias of zero.
    state = {**{key: torch.zeros_like(own[key]) for key in own if key.endswith(".expert_bias")}, **state}
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if any(key.endswith(".expert_bias") for key in unexpected):
        raise CheckpointError(f"{source} routes its experts with a balancing bias (expert_bias_rate in its config); "
                              "pass --expert_bias_rate above 0 to load it")
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
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(problems)}. Pass the --model_type, --hidden_size, "
            f"--num_hidden_layers and expert flags of the run that wrote it{hint}"
        )
    model.load_state_dict(state, strict=True)


def load_model(path, overrides=None, shape: TinyMindConfig | None = None) -> TinyMindForCausalLM:
    """A ready model from a `.pth`/`.safetensors` or a Hugging Face directory or repo id (tinymind, Llama,
    Mixtral, Qwen2/3-MoE; see convert.py), on the CPU.

    Its config is the one written beside the weights (for a bare `.pth`: `shape`, else an error), with
    `overrides` (config field → value: a YaRN stretch at inference, a MoE routing switch) applied over it;
    the weights must still fit the result. The model is float32 whatever the weights were stored in; that
    dtype is kept as `model.weights_dtype` (an export writes it back by default).
    """
    path = Path(path)
    if names_hf_model(path):
        try:
            loaded = load_hf(str(path))
        except UnsupportedArchitecture as err:
            raise CheckpointError(f"{path}: {err}") from None
        except OSError as err:  # a repo id that cannot be fetched
            raise CheckpointError(f"{path}: cannot load it ({' '.join(str(err).split())})") from None
        config = with_overrides(loaded.config, overrides, path)
        if config.to_dict() == loaded.config.to_dict():
            return loaded
        state, stored_dtype = loaded.state_dict(), loaded.weights_dtype
    else:
        state = read_state_dict(existing(path))
        config, stored_dtype = with_overrides(file_config(path, shape), overrides, path), first_dtype(state)
    model = TinyMindForCausalLM(config)
    load_into(model, state, path)
    model.weights_dtype = stored_dtype
    return model


def existing(path) -> Path:
    """`path` if something is there, else the error saying so; a name without a weights suffix may have been meant
    as a Hub repo id, but names_hf_model found it none."""
    if path.exists():
        return path
    if path.suffix in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: no such checkpoint file")
    raise CheckpointError(f"{path}: no such file or directory, nor an owner/name Hub repo id")


def file_config(path, shape) -> TinyMindConfig:
    """The config written beside the weights file `path`, else `shape` (the model flags or --config)."""
    if config_path(path).is_file():
        return TinyMindConfig.from_json_file(config_path(path))
    if shape is None:
        raise CheckpointError(f"{path}: no {config_path(path).name} beside it; give the model shape with flags "
                              "or --config")
    return shape


def first_dtype(state) -> torch.dtype:
    """The dtype the weights were stored in: their first floating tensor's (the embedding's)."""
    return next((value.dtype for value in state.values() if value.is_floating_point()), torch.float32)


def with_overrides(config, overrides, source) -> TinyMindConfig:
    if not overrides:
        return config
    try:
        return TinyMindConfig.from_dict({**config.to_dict(), **overrides})
    except ValueError as err:
        raise CheckpointError(f"{source} with the model flags given: {err}") from None
