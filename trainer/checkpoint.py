"""Weights on disk: atomic writes, safe reads, and loading into a model with a clear word on any mismatch.

A checkpoint is data, not code: `.pth` files are read with `weights_only=True` and
`.safetensors` through safetensors, so a file carrying pickled objects is refused.
Every write goes to a temporary file that is renamed over the target, so a crash or a
full disk at any instant leaves the previous complete file readable.
"""

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import TinyMindConfig, TinyMindForCausalLM
from model.convert import UnsupportedArchitecture, load_hf, names_hf_model

from .errors import UserError


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
    """Write a state dict (DESIGN.md layout) to `path`, safetensors for a `.safetensors` name and torch.save
    otherwise, plus the model config beside it."""
    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    if path.suffix == ".safetensors":
        if config.tie_word_embeddings:
            # safetensors refuses tensors that share memory; the tied head is rebuilt from the embedding on load.
            state.pop("lm_head.weight", None)
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
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
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not refused:
            raise UserError(f"{path}: truncated or corrupt checkpoint (not a readable torch file)") from None
        raise UserError(
            f"{path}: refused, it holds pickled Python objects ({refused.group(1)}), not only tensors; "
            "load it in a trusted session and re-save `model.state_dict()`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, SafetensorError, ValueError) as err:
        raise UserError(f"{path}: truncated or corrupt checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors (a resume state? pass the .pth weights file)")
    return state


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
