"""GGUF, the file llama.cpp and ollama run: a tinymind model as the llama.cpp architecture that computes the same
function, with its tokenizer (byte-level BPE vocabulary and merges, special ids) and chat template inside, so
`llama-cli -m model.gguf` needs no other file.

    dense                                          → llama       (q/k rows reordered for llama.cpp's rotary)
    dense with qk_norm                             → qwen3
    MoE with qk_norm, no shared experts            → qwen3moe
    MoE, no shared experts, renormalised weights   → llama with experts, as llama.cpp runs Mixtral
    MoE, weights not renormalised (norm_topk_prob) → qwen2moe    (shared experts behind a constant gate, below)
    MoE with shared experts, renormalised weights  → bailingmoe  (ungated shared experts, expert_weights_norm)

The MoE cases split so because llama.cpp fixes per architecture whether the top-k router weights are divided by
their sum: always in llama and qwen3moe, never in qwen2moe, as the file says in bailingmoe.

Rotary: llama.cpp's llama and bailingmoe graphs rotate adjacent pairs (2i, 2i+1) of each head where Hugging Face
and tinymind rotate i with i + head_dim/2, so the rows of q_proj and k_proj are reordered per head (llama.cpp's own
converter does the same); the qwen graphs rotate halves, as tinymind does, and take the rows as they are.

Qwen2-MoE's shared expert is scaled by sigmoid(gate · x); as in model/convert.py the gate weight is 2^-64, which
makes the factor exactly 1/2 in float32 (llama.cpp computes it as silu(z)/z, hence not 0), and the shared expert's
down projection is written doubled. That gate stays float32 in every `--dtype`, as do the norms and routers.
"""

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_TENSOR, SpecialVocab, TENSOR_NAMES, TokenType
from gguf.quants import quantize

from .config import TinyMindConfig
from .convert import SHARED_GATE_WEIGHT, SWIGLU, UnsupportedArchitecture

DTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
Q8_0_BLOCK = 32  # values per q8_0 block: a row of another length stays f16
PAIRED_ROTARY = ("llama", "bailingmoe")


def architecture(config: TinyMindConfig) -> str:
    """The llama.cpp architecture computing what `config` computes, or UnsupportedArchitecture naming the fix."""
    if config.hidden_act != "silu" or config.logit_softcap:
        raise UnsupportedArchitecture("llama.cpp's llama and qwen architectures run SwiGLU without a logit softcap: "
                                      "train with --hidden_act silu --logit_softcap 0 to write a GGUF")
    if config.value_embeds:
        raise UnsupportedArchitecture("llama.cpp's architectures add no embeddings to the attention's values: train "
                                      "with --value_embeds false to write a GGUF")
    if config.use_moe and config.expert_bias_rate:
        raise UnsupportedArchitecture("llama.cpp's MoE architectures choose experts without a per-expert bias: "
                                      "train with --expert_bias_rate 0 to write a GGUF")
    if config.rope_scaling is not None:
        raise UnsupportedArchitecture("YaRN rotary scaling is not written to GGUF: export without --yarn_factor and "
                                      "pass llama.cpp its --rope-scaling yarn options at run time")
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.qk_norm:
        if config.n_shared_experts or not config.norm_topk_prob:
            raise UnsupportedArchitecture("a MoE with qk_norm runs in llama.cpp as qwen3moe, which has no shared "
                                          "experts and always renormalises the top-k weights")
        return "qwen3moe"
    if not config.norm_topk_prob:
        return "qwen2moe"
    return "bailingmoe" if config.n_shared_experts else "llama"


def write_gguf(model, tokenizer, tokenizer_dir, path, dtype="f32") -> str:
    """Write `model` with `tokenizer` (saved in `tokenizer_dir`) to the GGUF file `path`; return its architecture."""
    config = model.config
    arch = architecture(config)
    pre = pre_tokenizer(tokenizer)
    tensor_type, file_type = DTYPES[dtype]
    writer = GGUFWriter(str(path), arch)
    write_hyperparameters(writer, config, arch, file_type)
    write_tokenizer(writer, tokenizer, tokenizer_dir, config.vocab_size, pre)
    state = {key: value.detach().float().cpu() for key, value in model.state_dict().items()}
    for name, tensor in gguf_tensors(state, config, arch):
        add_tensor(writer, name, tensor, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch


def write_hyperparameters(writer, config, arch, file_type):
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.intermediate_size * max(config.n_shared_experts, 1))
    if arch == "bailingmoe":
        writer.add_expert_shared_count(config.n_shared_experts)
        writer.add_expert_weights_norm(True)
        writer.add_expert_weights_scale(1.0)
        writer.add_leading_dense_block_count(0)


# Llama-3's pre-tokenizer pattern, as its tokenizer.json holds it: `scripts.train_tokenizer --split llama3` fits with
# it, and llama.cpp cuts text the same way under the name "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, one of the two scripts/train_tokenizer.py makes:
    GPT-2's byte-level split ("gpt-2", the shipped tokenizer's), or Llama-3's pattern before a byte-level
    alphabet ("llama-bpe")."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    pieces = pre.get("pretokenizers") or [{}, {}]
    if (pre.get("type") == "Sequence" and len(pieces) == 2
            and pieces[0] == {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
            and pieces[1].get("type") == "ByteLevel" and not pieces[1].get("use_regex", True)
            and not pieces[1].get("add_prefix_space")):
        return "llama-bpe"
    raise UnsupportedArchitecture(f"tokenizer {tokenizer.name_or_path}: pre-tokenizer {json.dumps(pre)[:120]} has no "
                                  "llama.cpp counterpart written here (GPT-2's byte-level split and Llama-3's pattern)")


def write_tokenizer(writer, tokenizer, tokenizer_dir, vocab_size, pre):
    if len(tokenizer) > vocab_size:
        raise UnsupportedArchitecture(f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model "
                                      f"only {vocab_size} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        tokens.append(token)
        types.append(TokenType.NORMAL if index not in added else
                     TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    for index in range(len(tokenizer), vocab_size):  # embedding rows no token uses
        tokens.append(f"[PAD{index}]")
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UnsupportedArchitecture(f"{tokenizer_dir}: no BPE merges in its tokenizer.json")
    special.add_special_token.setdefault("bos", False)  # prompts are framed by the chat template, not a prefix
    special.add_to_gguf(writer, quiet=True)


def gguf_tensors(state, config, arch):
    """(GGUF name, float32 tensor) for every weight llama.cpp's `arch` graph reads."""
    def name(kind, layer=None):
        return TENSOR_NAMES[kind].format(bid=layer) + ".weight"

    yield name(MODEL_TENSOR.TOKEN_EMBD), state["model.embed_tokens.weight"]
    yield name(MODEL_TENSOR.OUTPUT_NORM), state["model.norm.weight"]
    yield name(MODEL_TENSOR.OUTPUT), state["lm_head.weight"]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if arch in PAIRED_ROTARY:
            q, k = paired_rotary_rows(q, heads), paired_rotary_rows(k, kv_heads)
        yield name(MODEL_TENSOR.ATTN_NORM, i), state[p + "input_layernorm.weight"]
        yield name(MODEL_TENSOR.ATTN_Q, i), q
        yield name(MODEL_TENSOR.ATTN_K, i), k
        yield name(MODEL_TENSOR.ATTN_V, i), state[p + "self_attn.v_proj.weight"]
        yield name(MODEL_TENSOR.ATTN_OUT, i), state[p + "self_attn.o_proj.weight"]
        if config.qk_norm:
            yield name(MODEL_TENSOR.ATTN_Q_NORM, i), state[p + "self_attn.q_norm.weight"]
            yield name(MODEL_TENSOR.ATTN_K_NORM, i), state[p + "self_attn.k_norm.weight"]
        yield name(MODEL_TENSOR.FFN_NORM, i), state[p + "post_attention_layernorm.weight"]
        if not config.use_moe:
            for kind, proj in zip((MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN), SWIGLU):
                yield name(kind, i), state[f"{p}mlp.{proj}.weight"]
            continue
        yield name(MODEL_TENSOR.FFN_GATE_INP, i), state[p + "mlp.gate.weight"]
        for kind, proj in zip((MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP), SWIGLU):
            yield name(kind, i), torch.stack([state[f"{p}mlp.experts.{e}.{proj}.weight"]
                                              for e in range(config.n_routed_experts)])
        if arch in ("qwen2moe", "bailingmoe"):
            yield from shared_expert(state, config, arch, i, name)


def shared_expert(state, config, arch, layer, name):
    """The shared experts as one SwiGLU whose hidden units are all of theirs (qwen2moe: gated, see above)."""
    p = f"model.layers.{layer}.mlp.shared_experts."
    width, hidden = config.intermediate_size, config.hidden_size
    if config.n_shared_experts:
        gate, up, down = (torch.cat([state[f"{p}{k}.{proj}.weight"] for k in range(config.n_shared_experts)], dim=axis)
                          for proj, axis in zip(SWIGLU, (0, 0, 1)))
    else:  # qwen2moe needs a shared expert: an all-zero one adds exactly nothing
        gate, up, down = torch.zeros(width, hidden), torch.zeros(width, hidden), torch.zeros(hidden, width)
    if arch == "qwen2moe":
        down = 2 * down
        yield name(MODEL_TENSOR.FFN_GATE_INP_SHEXP, layer), torch.full((hidden,), SHARED_GATE_WEIGHT)
    for kind, weight in zip((MODEL_TENSOR.FFN_GATE_SHEXP, MODEL_TENSOR.FFN_UP_SHEXP, MODEL_TENSOR.FFN_DOWN_SHEXP),
                            (gate, up, down)):
        yield name(kind, layer), weight


def paired_rotary_rows(weight, heads):
    """Reorder each head's rows from rotate-half order (i pairs with i + d/2) to adjacent pairs (2i, 2i + 1)."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def add_tensor(writer, name, tensor, tensor_type):
    """Norms, routers and the shared-expert gate (vectors and `ffn_gate_inp`) stay float32, as in llama.cpp's own
    converter; q8_0 needs rows that are whole blocks and falls back to f16 for others."""
    data = tensor.contiguous().numpy()
    if data.ndim == 1 or ".ffn_gate_inp." in name or tensor_type == GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif tensor_type == GGMLQuantizationType.F16 or data.shape[-1] % Q8_0_BLOCK:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)


# The project's chat template and its translation into ollama's Go template language (tools and thinking included).
CHAT_TEMPLATE = Path(__file__).resolve().parent / "tokenizer" / "chat_template.jinja"
# Beside the model code, not in the tokenizer folder, which retraining the shipped tokenizer replaces whole.
OLLAMA_TEMPLATE = Path(__file__).resolve().parent / "ollama_template.gotmpl"


def modelfile(tokenizer, gguf_name) -> str:
    """An ollama Modelfile for the GGUF beside it, with the end token as stop and the chat template in ollama's Go
    template language (`ollama_template`)."""
    lines = [f"FROM ./{gguf_name}"]
    template, _ = ollama_template(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


def ollama_template(tokenizer):
    """(the tokenizer's chat template in ollama's Go template language or None, what it is, in words). The project's
    own template is translated by hand (ollama_template.gotmpl, tools and thinking included, which turns on ollama's
    tool calling and thinking for the model); another one is derived when it frames each message on its own (prefix
    + content + suffix per role, as ChatML does), without tools; else none, and ollama uses the GGUF's own."""
    if tokenizer.chat_template == CHAT_TEMPLATE.read_text():
        return OLLAMA_TEMPLATE.read_text(), "tinymind's, with tools and thinking"
    template = go_template(tokenizer)
    if template is None:
        return None, ("none: the tokenizer's chat template does not frame each message on its own, so ollama uses the "
                      "GGUF's")
    return template, ("derived from the tokenizer's chat template, without tools or thinking (only tinymind's own "
                      "template, model/tokenizer/chat_template.jinja, carries them)")


def go_template(tokenizer):
    marker = "\x00CONTENT\x00"

    def render(messages, prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) if messages else ""

    frames = {}
    for role in ("system", "user", "assistant"):
        messages = [{"role": "user", "content": "q"}] if role == "assistant" else []
        before = render(messages)
        text = render(messages + [{"role": role, "content": marker}])
        if not text.startswith(before) or text.count(marker) != 1:
            return None
        frames[role] = text[len(before):].split(marker)
    generation = render([{"role": "user", "content": "q"}], prompt=True)[len(render([{"role": "user", "content": "q"}])):]
    # The framing must compose: a whole conversation renders as its messages' frames one after another.
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    expected = "".join(frames[m["role"]][0] + m["content"] + frames[m["role"]][1] for m in conversation) + generation
    if render(conversation, prompt=True) != expected:
        return None
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
                       for i, (role, (pre, post)) in enumerate(frames.items()))
    return f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{generation}"
