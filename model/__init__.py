"""The TinyMind network. `from model import TinyMindConfig, TinyMindForCausalLM, load_model`."""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import TinyMindConfig
from .generate import Sampling, fast_generate, stream_tokens
from .model import MoEFeedForward, TinyMindForCausalLM, masked_cross_entropy, masked_mean, token_cross_entropy
from .weights import CheckpointError, atomic_folder, atomic_write, config_path, load_model, read_state_dict, save_weights

# Registering makes AutoConfig / AutoModelForCausalLM.from_pretrained work on saved tinymind directories.
AutoConfig.register(TinyMindConfig.model_type, TinyMindConfig)
AutoModelForCausalLM.register(TinyMindConfig, TinyMindForCausalLM)

__all__ = ["TinyMindConfig", "TinyMindForCausalLM", "MoEFeedForward", "masked_cross_entropy", "masked_mean", "token_cross_entropy",
           "Sampling", "fast_generate", "stream_tokens", "CheckpointError", "atomic_folder", "atomic_write", "config_path", "load_model",
           "read_state_dict", "save_weights"]
