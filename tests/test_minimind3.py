"""MiniMind-3 checkpoints: its `.pth` layout loads strictly (dense, and MoE routing top-1 without shared experts),
computes what an independent implementation of its published architecture computes, chats in 3-eval.py with its
own tokenizer and fine-tunes in 2-sft.py with an exact loss mask on its chat template."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import CONVERSATIONS, ROOT, TEXTS, run_stage, write_jsonl
from dataset import SFTDataset, load_tokenizer
from model import TinyMindConfig, TinyMindForCausalLM
from trainer import load_flagged
from trainer.flags import add_model_flags, new_parser, parse

# MiniMind-3's shape scaled down: 8 query heads over 4 key/value heads, FFN = ceil(hidden·π/64)·64, eps 1e-6.
SHAPE = dict(hidden=64, layers=2, heads=8, kv_heads=4, ffn=math.ceil(64 * math.pi / 64) * 64, vocab=320, eps=1e-6,
             theta=1e6, experts=4)
FLAGS = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "8", "--num_key_value_heads", "4",
         "--intermediate_size", str(SHAPE["ffn"]), "--vocab_size", "320", "--qk_norm", "true", "--rms_norm_eps", "1e-6",
         "--max_seq_len", "64"]
MOE_FLAGS = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "1", "--n_shared_experts", "0",
             "--norm_topk_prob", "true", "--aux_loss_alpha", "5e-4", "--seq_aux", "false"]


def minimind3_state_dict(moe, seed=0):
    """A state dict as MiniMind-3 saves one (from its published layout, not from tinymind's modules): fp16, the
    MiniMind2 names plus per-head q_norm/k_norm, the router at mlp.gate.weight, no shared experts, the head saved."""
    g = torch.Generator().manual_seed(seed)
    h, ffn, head_dim = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["heads"]

    def weight(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).half()

    def gain(n):
        return (1 + 0.2 * torch.randn(n, generator=g)).half()

    state = {"model.embed_tokens.weight": weight(SHAPE["vocab"], h, scale=0.5), "model.norm.weight": gain(h)}
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": gain(h), p + "post_attention_layernorm.weight": gain(h),
                  p + "self_attn.q_proj.weight": weight(SHAPE["heads"] * head_dim, h),
                  p + "self_attn.k_proj.weight": weight(SHAPE["kv_heads"] * head_dim, h),
                  p + "self_attn.v_proj.weight": weight(SHAPE["kv_heads"] * head_dim, h),
                  p + "self_attn.o_proj.weight": weight(h, SHAPE["heads"] * head_dim),
                  p + "self_attn.q_norm.weight": gain(head_dim), p + "self_attn.k_norm.weight": gain(head_dim)}
        ffns = [f"{p}mlp.experts.{e}." for e in range(SHAPE["experts"])] if moe else [f"{p}mlp."]
        if moe:
            state[p + "mlp.gate.weight"] = weight(SHAPE["experts"], h, scale=1.0)
        for f in ffns:
            state |= {f + "gate_proj.weight": weight(ffn, h), f + "up_proj.weight": weight(ffn, h),
                      f + "down_proj.weight": weight(h, ffn)}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def reference_logits(state, ids, moe):
    """MiniMind-3's forward for one sequence, written from its description with plain tensor operations."""
    s = {key: value.double() for key, value in state.items()}
    heads, kv_heads, eps = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["eps"]
    head_dim = SHAPE["hidden"] // heads

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def swiglu(x, prefix):
        return (F.silu(x @ s[prefix + "gate_proj.weight"].T) * (x @ s[prefix + "up_proj.weight"].T)) @ s[prefix + "down_proj.weight"].T

    T = len(ids)
    inv = 1 / SHAPE["theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv  # [T, head_dim/2]
    cos, sin = angle.cos(), angle.sin()

    def rotary(x):  # [T, n, head_dim], the first half of each head paired with the second
        a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
        c, n = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * n, b * c + a * n], dim=-1)

    x = s["model.embed_tokens.weight"][ids]
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        h = norm(x, s[p + "input_layernorm.weight"])
        q = (h @ s[p + "self_attn.q_proj.weight"].T).view(T, heads, head_dim)
        k = (h @ s[p + "self_attn.k_proj.weight"].T).view(T, kv_heads, head_dim)
        v = (h @ s[p + "self_attn.v_proj.weight"].T).view(T, kv_heads, head_dim)
        q, k = rotary(norm(q, s[p + "self_attn.q_norm.weight"])), rotary(norm(k, s[p + "self_attn.k_norm.weight"]))
        out = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kv].T / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out.append(scores.softmax(-1) @ v[:, kv])
        x = x + torch.cat(out, dim=-1) @ s[p + "self_attn.o_proj.weight"].T
        h = norm(x, s[p + "post_attention_layernorm.weight"])
        if moe:  # top-1 with norm_topk_prob: the chosen expert's output, weight exactly 1
            chosen = (h @ s[p + "mlp.gate.weight"].T).argmax(-1)
            x = x + torch.stack([swiglu(h[t], f"{p}mlp.experts.{int(chosen[t])}.") for t in range(T)])
        else:
            x = x + swiglu(h, p + "mlp.")
    return norm(x, s["model.norm.weight"]) @ s["lm_head.weight"].T


def flagged_args(*flags):
    parser = new_parser("")
    add_model_flags(parser)
    return parse(parser, ["--device", "cpu", *flags])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_top1"])
def test_minimind3_pth_loads_strictly_and_computes_its_architecture(moe, tmp_path):
    checkpoint = tmp_path / "minimind3.pth"
    torch.save(minimind3_state_dict(moe), checkpoint)  # a bare .pth, no config beside it: the flags give the shape
    model = load_flagged(checkpoint, flagged_args(*FLAGS, *(MOE_FLAGS if moe else []))).eval()
    assert model.config.qk_norm and (not moe or model.config.n_shared_experts == 0)
    ids = torch.randint(0, SHAPE["vocab"], (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None]).logits[0].double()
    expected = reference_logits(minimind3_state_dict(moe), ids, moe)
    assert (ours - expected).abs().max().item() < 1e-4


def test_presets_have_minimind3s_shape_and_size():
    dense = flagged_args("--config", ROOT / "configs" / "minimind3_768.json")
    moe = flagged_args("--config", ROOT / "configs" / "minimind3_moe_768.json")
    from trainer.flags import model_config
    for args, total, active in ((dense, 63.9e6, 63.9e6), (moe, 198.4e6, 63.9e6)):
        config = model_config(args)
        assert (config.head_dim, config.intermediate_size, config.qk_norm, config.rms_norm_eps) == (96, 2432, True, 1e-6)
        with torch.device("meta"):
            counts = TinyMindForCausalLM(config).parameter_counts()
        assert abs(counts[0] - total) < 0.1e6 and abs(counts[1] - active) < 0.1e6, counts
    config = model_config(moe)
    assert (config.num_experts_per_tok, config.n_shared_experts, config.norm_topk_prob, config.seq_aux) == (1, 0, True, False)


def test_yarn_factor_flag_sets_minimind3s_rope_scaling_over_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "minimind3.pth"
    torch.save(minimind3_state_dict(False), checkpoint)
    plain = load_flagged(checkpoint, flagged_args(*FLAGS)).eval()
    scaled = load_flagged(checkpoint, flagged_args(*FLAGS, "--yarn_factor", "16")).eval()
    assert scaled.config.rope_scaling == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                                          "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    ids = torch.arange(40)[None] % SHAPE["vocab"]
    with torch.no_grad():
        # the fastest-turning frequencies are kept, so the first positions barely move; later ones do
        assert not torch.allclose(plain(ids).logits[0, -1], scaled(ids).logits[0, -1])


# ---- its tokenizer and chat template ---------------------------------------------------------------------

# Special tokens at other ids than tinymind's (<|im_end|> is 4 here, 2 in model/tokenizer).
SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
# The framing MiniMind-3's template gives (written here from its behaviour): every assistant turn opens a thinking
# block, and the generation prompt carries an empty one.
TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def minimind3_tokenizer(tmp_path_factory):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = TEXTS + [turn["content"] for chat in CONVERSATIONS for turn in chat]
    bpe.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=SHAPE["vocab"], special_tokens=SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path_factory.mktemp("minimind3_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", chat_template=TEMPLATE,
                            clean_up_tokenization_spaces=False).save_pretrained(directory)
    return directory


def test_sft_mask_on_minimind3_template_covers_answers_and_end_token_only(minimind3_tokenizer, tmp_path):
    tokenizer = load_tokenizer(minimind3_tokenizer)
    assert tokenizer.eos_token_id == 4 and len(tokenizer) <= SHAPE["vocab"]
    chat = CONVERSATIONS[2]  # system, two exchanges
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": chat}]), tokenizer, 512)
    ids, targets, mask = data[0]
    learned = [int(t) for t, m in zip(targets, mask) if m]
    answers = [tokenizer(turn["content"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for turn in chat if turn["role"] == "assistant"]
    assert learned == [token for answer in answers for token in answer]
    think = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    assert think <= set(ids.tolist()) and not think & set(learned)


def test_minimind3_checkpoint_chats_and_fine_tunes_with_its_tokenizer(minimind3_tokenizer, tmp_path):
    checkpoint = tmp_path / "minimind3.pth"
    torch.save(minimind3_state_dict(True), checkpoint)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in CONVERSATIONS * 4])
    common = [*FLAGS, *MOE_FLAGS, "--tokenizer_path", minimind3_tokenizer]
    chat = run_stage("3-eval.py", *common, "--checkpoint", checkpoint, "--prompt", "你好", "--temperature", "0",
                     "--max_new_tokens", "8", cwd=tmp_path)
    assert "> 你好" in chat.stdout
    run_stage("2-sft.py", *common, "--init_from", checkpoint, "--data_path", sft, "--batch_size", "4",
              "--max_steps", "3", "--log_interval", "1", "--out_dir", tmp_path / "out", cwd=tmp_path)
    written = json.loads((tmp_path / "out" / "sft_moe" / "sft_64_moe.json").read_text())
    assert written["qk_norm"] and written["num_experts_per_tok"] == 1 and written["n_shared_experts"] == 0


def test_the_tokenizer_a_run_trained_with_travels_with_its_checkpoints(minimind3_tokenizer, tmp_path):
    """Given once to pretraining, the tokenizer is saved in each run folder and taken from there by SFT, the
    chat, --resume and the Hugging Face export, without --tokenizer_path."""
    write_jsonl(tmp_path / "data/pretrain.jsonl", [{"text": text} for text in TEXTS * 4])
    write_jsonl(tmp_path / "data/sft.jsonl", [{"conversations": c} for c in CONVERSATIONS * 4])
    tiny = [*FLAGS, "--batch_size", "4", "--max_steps", "2"]
    pre = run_stage("1-pretrain.py", *tiny, "--tokenizer_path", minimind3_tokenizer, cwd=tmp_path)
    assert f"tokenizer: {minimind3_tokenizer} (" in pre.stdout
    ours = json.loads((minimind3_tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((tmp_path / "output/pretrain_dense/tokenizer/tokenizer.json").read_text())["model"]["vocab"] == ours

    sft = run_stage("2-sft.py", *tiny, cwd=tmp_path)
    assert "tokenizer: output/pretrain_dense/tokenizer (" in sft.stdout
    resumed = run_stage("2-sft.py", *tiny[:-1], "3", "--resume", cwd=tmp_path)  # one step more
    assert "tokenizer: output/sft_dense/tokenizer (" in resumed.stdout

    chat = run_stage("3-eval.py", *FLAGS, "--prompt", "你好", "--temperature", "0", "--max_new_tokens", "4",
                     cwd=tmp_path)
    assert "tokenizer output/sft_dense/tokenizer" in chat.stderr and "> 你好" in chat.stdout
    run_stage("-m", "scripts.convert_hf", "export", "--checkpoint", "output/sft_dense/sft_64.pth", "--out", "hf",
              cwd=tmp_path)
    assert json.loads((tmp_path / "hf/tokenizer.json").read_text())["model"]["vocab"] == ours
    other = run_stage("3-eval.py", *FLAGS, "--tokenizer_path", ROOT / "model/tokenizer", "--prompt", "你好",
                      cwd=tmp_path, check=False)  # the project's 6,400 tokens do not fit a 320-token model
    assert other.returncode == 2 and "has a vocabulary of 320 tokens but the tokenizer has 6400" in other.stderr
