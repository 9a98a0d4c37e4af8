"""Hugging Face interop: a tinymind model as a stock `transformers` architecture, and back.

`export_hf` writes a directory that `AutoModelForCausalLM.from_pretrained(dir)` loads with no
remote code, so transformers, vLLM and llama.cpp's converter can run it (a model with
`hidden_act` relu2 is written as transformers computes it, hidden_act "relu2"; vLLM's and llama.cpp's
Llama take SwiGLU only). A logit softcap or an expert routing bias has no stock counterpart: refused.

    dense                                   → LlamaForCausalLM    (same module names, same maths)
    dense with qk_norm                      → Qwen3ForCausalLM    (Llama's names plus self_attn.{q,k}_norm)
    MoE with qk_norm, without shared experts → Qwen3MoeForCausalLM (MiniMind-3's MoE)
    MoE without shared experts,
    renormalised top-k weights (the default) → MixtralForCausalLM  (the same router and experts)
    any other MoE without qk_norm           → Qwen2MoeForCausalLM

Mixtral takes the softmax over all experts in float32, keeps the top k and divides them by their
sum: tinymind's router with `norm_topk_prob`, nothing more and nothing less. Qwen2-MoE and Qwen3-MoE
route the same way, renormalising only when `norm_topk_prob` is set; at top-1 that makes the chosen
expert's weight exactly 1 (tinymind, Qwen3-MoE and MiniMind-3 alike).

Qwen2-MoE routes exactly like tinymind (softmax over all experts in float32, top-k,
optional renormalisation), but differs in three ways, each absorbed without changing a logit:
- it carries q/k/v biases: written as zeros;
- it has one shared expert, scaled by sigmoid(shared_expert_gate · x): a gate weight of
  ~2^-64 makes that factor exactly 0.5 for any realistic x in float32 and bfloat16, so the
  shared expert's `down_proj` is written doubled; several tinymind shared experts are one
  SwiGLU whose hidden units are all of theirs (gate/up rows and down columns concatenated);
  a model without shared experts gets an all-zero one, which adds exactly nothing. The gate
  is tiny rather than zero because llama.cpp computes that sigmoid as silu(z)/z, which is
  0/0 at z = 0 (a float16 export flushes it to zero all the same: transformers and vLLM still
  get 0.5, but for llama.cpp export float32 or bfloat16);
A model with `qk_norm` (a learned RMSNorm on every query and key head before the rotary, as in
MiniMind-3 and Qwen3) is a Qwen3 or Qwen3-MoE. Without `qk_norm` no Qwen3 can stand in for a
tinymind model (the norm divides each head by its own RMS, which no weights undo), and a MoE with
`qk_norm` and shared experts has no stock architecture. YaRN rotary scaling (`rope_scaling`) is
written as the config's `rope_parameters` and read back from them, and written again as transformers 4's
`rope_scaling` for the tools pinned to it.

The MoE heads are written untied (`lm_head` a copy of the embedding) because llama.cpp's
qwen2moe loader requires an output tensor and not every runtime ties Mixtral's.

`load_hf` reads those architectures back (or a tinymind directory from `save_pretrained`) and
refuses, with UnsupportedArchitecture, anything it could not reproduce exactly. Weights are
only read as safetensors or with `torch.load(weights_only=True)`: a checkpoint is data, not code.
"""

import json
import math
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

from .config import ACTIVATIONS, TinyMindConfig
from .model import TinyMindForCausalLM

# A name ending so is a weights file, never a Hub repo id.
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")

SUPPORTED = ("LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM "
             "and TinyMind directories")

# Config fields spelled the same in tinymind, Llama and Qwen2-MoE.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)

# tinymind MoE field → the Hugging Face field, per architecture.
MOE_FIELDS = {
    "qwen2_moe": {
        "n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
        "intermediate_size": "moe_intermediate_size",
    },
    "qwen3_moe": {
        "n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
        "intermediate_size": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob",
    },
    "mixtral": {
        "n_routed_experts": "num_local_experts", "num_experts_per_tok": "num_experts_per_tok",
        "intermediate_size": "intermediate_size",
    },
}

# Settings a Hugging Face config must have for tinymind to compute the same function.
REQUIRED_SETTINGS = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "qwen3": {"attention_bias": False, "use_sliding_window": False},
    "qwen2_moe": {"use_sliding_window": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3_moe": {"attention_bias": False, "use_sliding_window": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": []},
    "mixtral": {"sliding_window": None},
}

ATTENTION_BIASES = ("q_proj", "k_proj", "v_proj")
SWIGLU = ("gate_proj", "up_proj", "down_proj")

# sigmoid(z) rounds to exactly 0.5 in float32 for |z| < 2^-25; with this weight that holds
# for hidden states summing to anything below 2^39, while z stays a normal, non-zero float.
SHARED_GATE_WEIGHT = 2.0**-64


class UnsupportedArchitecture(ValueError):
    """A Hugging Face directory tinymind cannot represent exactly; the message names what it can read."""


# ---- export -----------------------------------------------------------------------------------


def export_hf(model: TinyMindForCausalLM, out_dir, dtype=None) -> str:
    """Write `model` to `out_dir` as safetensors + config that stock transformers loads; return the class name."""
    config = model.config
    state = {key: value.detach().cpu().float() for key, value in model.state_dict().items()}
    if config.logit_softcap:
        raise UnsupportedArchitecture(f"logit_softcap {config.logit_softcap:g}: no stock transformers architecture "
                                      "with these blocks caps its logits; train with --logit_softcap 0 to export")
    if config.value_embeds:
        raise UnsupportedArchitecture("value_embeds: no stock transformers architecture adds embeddings to the "
                                      "attention's values; train with --value_embeds false to export")
    if config.use_moe and config.expert_bias_rate:
        raise UnsupportedArchitecture("expert_bias_rate: the stock MoE architectures choose experts without a "
                                      "per-expert bias; train with --expert_bias_rate 0 to export")
    if config.qk_norm and config.use_moe and config.n_shared_experts:
        raise UnsupportedArchitecture("a MoE with qk_norm and shared experts has no stock architecture (Qwen3-MoE "
                                      "has no shared experts); train it with --n_shared_experts 0")
    if not config.use_moe:
        hf_config, hf_state = (qwen3_config(config) if config.qk_norm else llama_config(config)), state
    elif config.qk_norm:
        hf_config, hf_state = qwen3_moe_config(config), with_stacked_experts(state, config)
    elif fits_mixtral(config):
        hf_config, hf_state = mixtral_config(config), with_stacked_experts(state, config)
    else:
        hf_config, hf_state = qwen2_moe_config(config), to_qwen2_moe(state, config)
    # transformers 5 reads rope_parameters; version 4, and tools pinned to it, read only this field.
    hf_config.rope_theta = config.rope_theta
    hf_model = AutoModelForCausalLM.from_config(hf_config)
    hf_model.load_state_dict(hf_state, strict=True)
    hf_model.to(dtype or model.dtype).save_pretrained(out_dir)
    if config.rope_scaling is not None:
        add_transformers4_rope_scaling(Path(out_dir) / "config.json")
    return type(hf_model).__name__


def add_transformers4_rope_scaling(config_file):
    """transformers 5 writes YaRN only as `rope_parameters`; version 4, and tools pinned to it, read only
    `rope_scaling` and would run plain RoPE without it. Version 5 reads `rope_scaling` first, taking the top-level
    `rope_theta` into it: the same rotary either way."""
    written = json.loads(config_file.read_text())
    written["rope_scaling"] = {key: value for key, value in written["rope_parameters"].items() if key != "rope_theta"}
    config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def common_hf_fields(config: TinyMindConfig) -> dict:
    # tinymind's YaRN leaves the tables unscaled unless told (MiniMind's convention); transformers' default is
    # 0.1 ln(factor) + 1, so the factor is always written
    rope = ({"rope_type": "default"} if config.rope_scaling is None else
            {"attention_factor": 1.0, **config.rope_scaling, "rope_type": "yarn"})
    rope.pop("type", None)
    return {
        **{name: getattr(config, name) for name in COMMON_FIELDS},
        "hidden_act": config.hidden_act,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
    }


def dense_fields(config: TinyMindConfig) -> dict:
    """What Llama and Qwen3 configs share for a dense tinymind model: the same SwiGLU blocks, no biases."""
    return {**common_hf_fields(config), "intermediate_size": config.intermediate_size, "head_dim": config.head_dim,
            "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False}


def llama_config(config: TinyMindConfig) -> LlamaConfig:
    return LlamaConfig(**dense_fields(config), mlp_bias=False)


def qwen3_config(config: TinyMindConfig) -> Qwen3Config:
    return Qwen3Config(**dense_fields(config), use_sliding_window=False)


def fits_mixtral(config: TinyMindConfig) -> bool:
    return config.n_shared_experts == 0 and config.norm_topk_prob


def moe_hf_fields(config: TinyMindConfig, model_type) -> dict:
    return {hf_name: getattr(config, name) for name, hf_name in MOE_FIELDS[model_type].items()}


def mixtral_config(config: TinyMindConfig) -> MixtralConfig:
    return MixtralConfig(
        **common_hf_fields(config),
        **moe_hf_fields(config, "mixtral"),
        head_dim=config.head_dim,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def qwen_moe_fields(config: TinyMindConfig, model_type) -> dict:
    """What Qwen2-MoE and Qwen3-MoE configs share for a tinymind MoE: every layer sparse, full attention, an untied
    head (see the module docstring)."""
    return {**common_hf_fields(config), **moe_hf_fields(config, model_type), "intermediate_size": config.intermediate_size,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False, "tie_word_embeddings": False}


def qwen2_moe_config(config: TinyMindConfig) -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        **qwen_moe_fields(config, "qwen2_moe"),
        shared_expert_intermediate_size=config.intermediate_size * max(config.n_shared_experts, 1),
        norm_topk_prob=config.norm_topk_prob,
        qkv_bias=True,
    )


def qwen3_moe_config(config: TinyMindConfig) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**qwen_moe_fields(config, "qwen3_moe"), head_dim=config.head_dim, attention_bias=False)


def with_stacked_experts(state: dict, config: TinyMindConfig) -> dict:
    """The attention, norms, untied head and routers as they are, each layer's routed experts stacked into
    `mlp.experts.gate_up_proj` [E, 2·width, hidden] and `mlp.experts.down_proj` [E, hidden, width], the way
    transformers 5 holds Mixtral's and Qwen2-MoE's experts."""
    hf = {key: value for key, value in state.items() if ".mlp." not in key}
    hf["lm_head.weight"] = state["lm_head.weight"].clone()
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        hf[f"{layer}mlp.gate.weight"] = state[f"{layer}mlp.gate.weight"]
        experts = [expert_weights(state, f"{layer}mlp.experts.{j}.") for j in range(config.n_routed_experts)]
        hf[f"{layer}mlp.experts.gate_up_proj"] = torch.stack([torch.cat([gate, up]) for gate, up, _ in experts])
        hf[f"{layer}mlp.experts.down_proj"] = torch.stack([down for _, _, down in experts])
    return hf


def to_qwen2_moe(state: dict, config: TinyMindConfig) -> dict:
    """tinymind state dict → Qwen2MoeForCausalLM's: stacked experts, zero q/k/v biases, the gated shared expert."""
    hf = with_stacked_experts(state, config)
    hidden, width = config.hidden_size, config.intermediate_size
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for proj in ATTENTION_BIASES:
            hf[f"{layer}self_attn.{proj}.bias"] = torch.zeros(state[f"{layer}self_attn.{proj}.weight"].shape[0])

        shared = [expert_weights(state, f"{layer}mlp.shared_experts.{k}.") for k in range(config.n_shared_experts)]
        if shared:
            gate, up, down = (torch.cat(parts, dim=axis) for parts, axis in zip(zip(*shared), (0, 0, 1)))
            down = 2 * down  # undoes the gate's constant 0.5
        else:
            gate, up, down = torch.zeros(width, hidden), torch.zeros(width, hidden), torch.zeros(hidden, width)
        for name, weight in zip(SWIGLU, (gate, up, down)):
            hf[f"{layer}mlp.shared_expert.{name}.weight"] = weight
        hf[f"{layer}mlp.shared_expert_gate.weight"] = torch.full((1, hidden), SHARED_GATE_WEIGHT)
    return hf


def expert_weights(state, prefix):
    return tuple(state[f"{prefix}{name}.weight"] for name in SWIGLU)


# ---- import -----------------------------------------------------------------------------------


def load_hf(path_or_repo) -> TinyMindForCausalLM:
    """A tinymind model from a Hugging Face directory or `owner/name` repo id (see SUPPORTED), in float32 whatever
    the files hold; `weights_dtype` keeps the dtype its config.json declares, which an export writes back."""
    path = local_directory(path_or_repo)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedArchitecture(f"{path}: no config.json there; tinymind reads {SUPPORTED}")
    written = json.loads(config_file.read_text())
    model_type = written.get("model_type")
    if model_type == TinyMindConfig.model_type:
        return load_tinymind_directory(path)
    if model_type not in IMPORTERS:
        architecture = (written.get("architectures") or [model_type])[0]
        raise UnsupportedArchitecture(f"{path} holds {architecture}; tinymind reads only {SUPPORTED}")

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_settings(hf_config, path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=torch.float32, weights_only=True)
    config, state = IMPORTERS[model_type](hf_model.state_dict(), hf_config, path)
    model = TinyMindForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.weights_dtype = hf_config.dtype or torch.float32
    return model


def names_hf_model(path_or_repo) -> bool:
    """A directory, or an `owner/name` Hub repo id (which may hold dots, as `Qwen/Qwen2.5-0.5B` does, but not
    spaces or a leading `./`)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return True
    return (not path.exists() and path.suffix not in WEIGHT_SUFFIXES and str(path_or_repo).count("/") == 1
            and is_repo_id(str(path_or_repo)))


def is_repo_id(name) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_directory(path_or_repo) -> Path:
    """The directory itself, or a Hub repo's snapshot (download errors are OSErrors, as a missing path is)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if not names_hf_model(path_or_repo):
        raise FileNotFoundError(f"{path_or_repo}: no such file or directory, nor an owner/name Hub repo id")
    try:
        # Only configs and safetensors: a repo's pickled .bin files are never fetched.
        return Path(snapshot_download(str(path_or_repo), allow_patterns=["*.json", "*.safetensors"]))
    except OSError as err:
        raise OSError(f"{path_or_repo}: cannot fetch it from the Hugging Face Hub ({err})") from None


def load_tinymind_directory(path) -> TinyMindForCausalLM:
    """A `save_pretrained` directory, built here and filled from its safetensors: transformers 5's
    `from_pretrained` builds on the meta device and leaves non-persistent buffers (the rotary table) unset."""
    model = TinyMindForCausalLM(TinyMindConfig.from_pretrained(path))
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():  # sharded
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not all((path / name).is_file() for name in files):
        raise UnsupportedArchitecture(f"{path}: no safetensors weights there (tinymind reads no pickled .bin files)")
    state = {key: value for name in files for key, value in load_file(path / name).items()}
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # save_pretrained drops the tied copy
    model.load_state_dict(state, strict=True)
    model.weights_dtype = model.config.dtype or torch.float32  # as in load_hf
    return model


def check_settings(hf_config, path):
    """Refuse config settings that would make tinymind compute a different function."""
    name = type(hf_config).__name__
    if hf_config.hidden_act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"{path}: {name} with hidden_act={hf_config.hidden_act!r} has no tinymind "
                                      f"counterpart (needs one of {', '.join(ACTIVATIONS)})")
    for field, needed in REQUIRED_SETTINGS[hf_config.model_type].items():
        if getattr(hf_config, field) != needed:
            raise UnsupportedArchitecture(f"{path}: {name} with {field}={getattr(hf_config, field)!r} "
                                          f"has no tinymind counterpart (needs {needed!r})")
    rope_scaling(hf_config.rope_parameters, path)
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise UnsupportedArchitecture(f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads")


def rope_scaling(rope, path) -> dict | None:
    """tinymind's `rope_scaling` for Hugging Face `rope_parameters`: None, or YaRN with every value explicit."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    unknown = set(rope) - {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                           "beta_slow", "attention_factor", "truncate"}
    if kind != "yarn" or unknown or rope.get("truncate", True) is not True or rope.get("factor") is None:
        detail = f"rotary scaling {kind!r}" + (f" with {sorted(unknown)}" if unknown else "")
        raise UnsupportedArchitecture(f"{path}: {detail} has no tinymind counterpart (tinymind reads plain YaRN)")
    factor = rope["factor"]
    attention = rope.get("attention_factor")
    return {**TinyMindConfig.yarn(factor, rope["original_max_position_embeddings"]),
            "beta_fast": rope.get("beta_fast", 32.0), "beta_slow": rope.get("beta_slow", 1.0),
            # transformers' default when a config leaves it out
            "attention_factor": attention if attention is not None else 0.1 * math.log(factor) + 1.0}


def tinymind_config(hf_config, state, **fields) -> TinyMindConfig:
    return TinyMindConfig(
        **{name: getattr(hf_config, name) for name in COMMON_FIELDS},
        rope_theta=hf_config.rope_parameters["rope_theta"],
        rope_scaling=rope_scaling(hf_config.rope_parameters, None),
        hidden_act=hf_config.hidden_act,
        # An untied head equal to the embedding (as Qwen2-MoE exports are written) is a tied one.
        tie_word_embeddings=hf_config.tie_word_embeddings
        or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]),
        **fields,
    )


def from_llama(state, hf_config, path):
    return tinymind_config(hf_config, state, intermediate_size=hf_config.intermediate_size), state


def from_qwen3(state, hf_config, path):
    return tinymind_config(hf_config, state, intermediate_size=hf_config.intermediate_size, qk_norm=True), state


def with_separate_experts(hf_state, hf_config):
    """The inverse of `with_stacked_experts`: attention, norms, head and routers, plus each expert on its own."""
    state = {key: value for key, value in hf_state.items() if ".mlp." not in key and not key.endswith(".bias")}
    for i in range(hf_config.num_hidden_layers):
        layer = f"model.layers.{i}."
        state[f"{layer}mlp.gate.weight"] = hf_state[f"{layer}mlp.gate.weight"]
        gate_up, down = hf_state[f"{layer}mlp.experts.gate_up_proj"], hf_state[f"{layer}mlp.experts.down_proj"]
        for j, (expert_gate_up, expert_down) in enumerate(zip(gate_up, down)):
            gate, up = expert_gate_up.chunk(2)
            for name, weight in zip(SWIGLU, (gate, up, expert_down)):
                state[f"{layer}mlp.experts.{j}.{name}.weight"] = weight
    return state


def moe_tinymind_fields(hf_config) -> dict:
    return {name: getattr(hf_config, hf_name) for name, hf_name in MOE_FIELDS[hf_config.model_type].items()}


def from_mixtral(hf_state, hf_config, path):
    state = with_separate_experts(hf_state, hf_config)
    config = tinymind_config(hf_config, state, use_moe=True, n_shared_experts=0, norm_topk_prob=True,
                             **moe_tinymind_fields(hf_config))
    return config, state


def from_qwen3_moe(hf_state, hf_config, path):
    state = with_separate_experts(hf_state, hf_config)
    config = tinymind_config(hf_config, state, use_moe=True, n_shared_experts=0, qk_norm=True,
                             **moe_tinymind_fields(hf_config))
    return config, state


def from_qwen2_moe(hf_state, hf_config, path):
    width = hf_config.moe_intermediate_size
    state = with_separate_experts(hf_state, hf_config)
    n_shared = set()
    for i in range(hf_config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for proj in ATTENTION_BIASES:  # absent when the config says qkv_bias false: zero all the same
            if hf_state.get(f"{layer}self_attn.{proj}.bias", torch.zeros(1)).any():
                raise UnsupportedArchitecture(f"{path}: layer {i} has a non-zero {proj} bias; tinymind has none")

        shared = [hf_state[f"{layer}mlp.shared_expert.{name}.weight"] for name in SWIGLU]
        if not shared[2].any():
            n_shared.add(0)  # an all-zero shared expert adds nothing: the export of a model without one
            continue
        if hf_state[f"{layer}mlp.shared_expert_gate.weight"].abs().max() > SHARED_GATE_WEIGHT:
            raise UnsupportedArchitecture(f"{path}: layer {i}'s shared expert has a learned, token-dependent gate; "
                                          "tinymind's shared experts are ungated")
        if shared[0].shape[0] % width:
            raise UnsupportedArchitecture(f"{path}: shared_expert_intermediate_size {shared[0].shape[0]} is not "
                                          f"a multiple of moe_intermediate_size {width}")
        gate, up, down = shared[0].split(width), shared[1].split(width), (shared[2] / 2).split(width, dim=1)
        n_shared.add(len(gate))
        for index, parts in enumerate(zip(gate, up, down)):
            for name, weight in zip(SWIGLU, parts):
                state[f"{layer}mlp.shared_experts.{index}.{name}.weight"] = weight
    if len(n_shared) != 1:
        raise UnsupportedArchitecture(f"{path}: layers differ in their shared experts; tinymind's are all alike")

    config = tinymind_config(
        hf_config, state, use_moe=True, n_shared_experts=n_shared.pop(), norm_topk_prob=hf_config.norm_topk_prob,
        **moe_tinymind_fields(hf_config),
    )
    return config, state


IMPORTERS = {"llama": from_llama, "qwen3": from_qwen3, "qwen3_moe": from_qwen3_moe, "mixtral": from_mixtral,
             "qwen2_moe": from_qwen2_moe}
