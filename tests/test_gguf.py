"""GGUF export (model/gguf_export.py, `scripts.convert_hf gguf`): the file reads back through the gguf package as
written, and llama.cpp (llama-cpp-python, when installed: `make test-llama-cpp`) decodes the same greedy tokens."""

import copy
import json
import shutil
import subprocess
from unittest import mock

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from conftest import GREETING, ROOT, TOOL_CHAT, run_stage
from dataset import load_tokenizer
from model import TinyMindConfig, TinyMindForCausalLM, fast_generate
from trainer.tools import load_tools
from dataset.chat import chat_messages, render_chat
from model.gguf_export import architecture, gguf_tensors, modelfile, ollama_template, write_gguf

TOKENIZER = ROOT / "model" / "tokenizer"
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
CASES = {  # one of each llama.cpp architecture the export chooses
    "llama": {},
    "qwen3": dict(qk_norm=True),
    "bailingmoe": dict(use_moe=True),  # tinymind's default MoE: top-2, a shared expert, renormalised
    "llama_experts": dict(use_moe=True, n_shared_experts=0),
    "qwen2moe": dict(use_moe=True, norm_topk_prob=False),
    "qwen3moe": dict(use_moe=True, qk_norm=True, n_shared_experts=0, num_experts_per_tok=1),
}
PROMPTS = ["床前明月光，疑是地上霜。", "What is the capital of France?", "To be, or not to be"]


def tiny_model(**fields):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(**SHAPE, **fields)).eval()
    with torch.no_grad():  # norm gains unlike 1, so a norm written to the wrong place changes the tokens
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


# Text where the two splits cut differently: punctuation before letters, Chinese commas, runs of digits, newlines
# after spaces, contractions.
SPLIT_TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "To be, or not to be: that's the question.\n\n",
               "In 1998年 there were 123456789 reviews -- \"great\"!  \n  Next line...", "HE'LL say 'no'; we'd (maybe) go."]


@pytest.fixture(scope="module", params=["llama3", "gpt2"])
def fitted(request, tmp_path_factory):
    """(split, tokenizer folder): a tokenizer scripts.train_tokenizer fits with that split."""
    from scripts.train_tokenizer import save, train
    folder = tmp_path_factory.mktemp(f"tokenizer_{request.param}")
    save(train(SPLIT_TEXTS * 40, vocab_size=500, split=request.param), folder)
    return request.param, folder


def field(reader, key):
    value = reader.fields[key]
    if value.types and value.types[0].name == "ARRAY":
        return [value.contents(i) for i in range(len(value.data))]
    return value.contents()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_every_tensor_and_key_as_written(dtype, tokenizer, tmp_path):
    model = tiny_model(use_moe=True)
    path = tmp_path / "model.gguf"
    assert write_gguf(model, tokenizer, TOKENIZER, path, dtype) == "bailingmoe"
    reader = GGUFReader(path)

    assert field(reader, "general.architecture") == "bailingmoe"
    config = model.config
    expected = {"embedding_length": 64, "block_count": 2, "feed_forward_length": config.intermediate_size,
                "attention.head_count": 4, "attention.head_count_kv": 2, "expert_count": 4, "expert_used_count": 2,
                "expert_shared_count": 1, "expert_weights_norm": True, "rope.dimension_count": 16,
                "context_length": config.max_position_embeddings}
    assert {key: field(reader, f"bailingmoe.{key}") for key in expected} == expected
    assert field(reader, "bailingmoe.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(reader, "bailingmoe.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)

    # the tokenizer: every token, its merges, the special ids and the chat template
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    merges = json.loads((TOKENIZER / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = [field(reader, f"tokenizer.ggml.{kind}_token_id") for kind in ("bos", "eos", "padding")]
    assert ids == [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert field(reader, "tokenizer.ggml.add_bos_token") is False

    written = dict(gguf_tensors({k: v.float() for k, v in model.state_dict().items()}, config, "bailingmoe"))
    read = {tensor.name: tensor for tensor in reader.tensors}
    assert read.keys() == written.keys()
    for name, tensor in written.items():
        data = read[name]
        assert list(reversed(data.shape.tolist())) == list(tensor.shape), name  # GGUF lists dimensions innermost first
        values = dequantize(data.data, data.tensor_type).reshape(tensor.shape)
        if data.tensor_type == GGMLQuantizationType.F32:
            assert np.array_equal(values, tensor.numpy()), name
        elif data.tensor_type == GGMLQuantizationType.F16:
            assert np.array_equal(values, tensor.half().float().numpy()), name
        else:  # q8_0: each block of 32 keeps its values to 1/127 of the block's largest
            assert data.tensor_type == GGMLQuantizationType.Q8_0
            assert np.abs(values - tensor.numpy()).max() <= np.abs(tensor.numpy()).max() / 127 + 1e-6, name
    vectors = [t for t in reader.tensors if len(t.shape) == 1 or ".ffn_gate_inp." in t.name]
    assert vectors and all(t.tensor_type == GGMLQuantizationType.F32 for t in vectors)  # norms and routers stay f32


def test_a_fitted_tokenizer_names_its_split_as_llama_cpp_knows_it(fitted, tmp_path):
    split, folder = fitted
    fitted_tokenizer = load_tokenizer(folder)
    path = tmp_path / "model.gguf"
    write_gguf(tiny_model(vocab_size=len(fitted_tokenizer)), fitted_tokenizer, folder, path, "f32")
    assert field(GGUFReader(path), "tokenizer.ggml.pre") == {"llama3": "llama-bpe", "gpt2": "gpt-2"}[split]


def test_paired_rotary_rows_put_each_half_pair_side_by_side():
    from model.gguf_export import paired_rotary_rows
    weight = torch.arange(2 * 8, dtype=torch.float32)[:, None].expand(16, 3)  # 2 heads of 8 rows, row i holds i
    assert paired_rotary_rows(weight, heads=2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_architectures_llama_cpp_cannot_run_exactly_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="qwen3moe, which has no shared experts"):
        architecture(TinyMindConfig(**SHAPE, use_moe=True, qk_norm=True))
    with pytest.raises(ValueError, match="--yarn_factor"):
        architecture(TinyMindConfig(**SHAPE, rope_scaling=TinyMindConfig.yarn(4, 512)))
    for nanochat in (dict(hidden_act="relu2"), dict(logit_softcap=15.0)):
        with pytest.raises(ValueError, match="--hidden_act silu --logit_softcap 0"):
            architecture(TinyMindConfig(**SHAPE, **nanochat))
    with pytest.raises(ValueError, match="--expert_bias_rate 0"):
        architecture(TinyMindConfig(**SHAPE, use_moe=True, expert_bias_rate=1e-3))
    with pytest.raises(ValueError, match="--value_embeds false"):
        architecture(TinyMindConfig(**SHAPE, value_embeds=True))


def test_cli_writes_the_gguf_and_a_modelfile_and_refuses_in_one_line(tmp_path):
    model = tiny_model()
    checkpoint = tmp_path / "sft_64.pth"
    torch.save(model.state_dict(), checkpoint)
    model.config.to_json_file(checkpoint.with_suffix(".json"))
    result = run_stage("-m", "scripts.convert_hf", "gguf", "--checkpoint", checkpoint, "--out", tmp_path / "g" / "m.gguf",
                       cwd=ROOT)
    assert "(llama, f16," in result.stderr + result.stdout
    assert "(its chat template: tinymind's, with tools and thinking)" in result.stdout
    recipe = (tmp_path / "g" / "Modelfile").read_text()
    assert recipe.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in recipe
    assert "{{- range .Tools }}" in recipe and "{{- if .ToolCalls }}" in recipe  # the project's template, by hand

    TinyMindConfig(**SHAPE, use_moe=True, qk_norm=True).to_json_file(checkpoint.with_suffix(".json"))
    torch.save(TinyMindForCausalLM(TinyMindConfig(**SHAPE, use_moe=True, qk_norm=True)).state_dict(), checkpoint)
    refused = run_stage("-m", "scripts.convert_hf", "gguf", "--checkpoint", checkpoint, "--out", tmp_path / "x.gguf",
                        cwd=ROOT, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "qwen3moe" in refused.stderr and not (tmp_path / "x.gguf").exists()


# ---- ollama's template --------------------------------------------------------------------------------------


def ollama_render(template, requests):
    """`requests` (ollama /api/chat bodies) rendered through `template` as ollama renders them (tests/ollama/render.go,
    run with Go), and the tool-call and thinking tags ollama would find in the template."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: `make test-ollama` installs it and runs these")
    result = subprocess.run(["go", "run", str(ROOT / "tests" / "ollama" / "render.go")], capture_output=True, text=True,
                            input=json.dumps({"template": template, "requests": requests}), check=True, timeout=300)
    return json.loads(result.stdout)


def same_text_but_json_spacing(ours, theirs):
    """Equal line by line, but for lines that are one JSON value each, which need only be equal as JSON (ollama
    writes JSON compactly, with Go's key order)."""

    def value(line):
        try:
            return json.loads(line)
        except ValueError:
            return line

    assert len(ours.split("\n")) == len(theirs.split("\n")), (ours, theirs)
    for mine, other in zip(ours.split("\n"), theirs.split("\n")):
        assert mine == other or value(mine) == value(other), (mine, other)


def test_another_framed_chat_template_becomes_a_go_template_without_tools(tokenizer):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chatml
    recipe = modelfile(tokenizer, "m.gguf")
    assert '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n' in recipe
    assert ".Tools" not in recipe
    assert ollama_template(tokenizer)[1].startswith("derived from the tokenizer's chat template, without tools")
    tokenizer.chat_template = "{{ messages | length }}"  # frames nothing: no TEMPLATE, ollama takes the GGUF's own
    assert "TEMPLATE" not in modelfile(tokenizer, "m.gguf")
    assert ollama_template(tokenizer)[1].startswith("none:")


def test_the_modelfile_template_renders_tools_and_thinking_as_ollama_would_as_tinymind_does(tokenizer):
    calculator = load_tools("calculator").schemas
    call = {"function": {"name": "calculator", "arguments": {"expression": "17*23"}}}
    conversations = [  # (ollama's request fields, tinymind's thinking switch: ollama thinks unless told not to)
        (dict(messages=[{"role": "user", "content": "Hi"}]), True),
        (dict(messages=[{"role": "system", "content": "Be brief."}, *GREETING, {"role": "user", "content": "2+2?"}]),
         True),
        (dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "17*23?"}],
              tools=calculator), True),
        (dict(messages=[{"role": "user", "content": "17*23 and 2*3?"},
                        {"role": "assistant", "content": "", "thinking": "Two products.", "tool_calls": [call, call]},
                        {"role": "tool", "content": "391"}, {"role": "tool", "content": "6"},
                        {"role": "assistant", "content": "391 and 6."}, {"role": "user", "content": "Thanks"}],
              tools=calculator, think=False), False),
        (dict(messages=[{"role": "user", "content": "17*23?"},
                        {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]},
                        {"role": "tool", "content": "391"}], tools=calculator, think=True), True),
    ]
    template = modelfile(tokenizer, "m.gguf").split('TEMPLATE """')[1].split('"""')[0]
    rendered = ollama_render(template, [request for request, _ in conversations])
    for (request, thinking), theirs in zip(conversations, rendered["prompts"]):
        messages = [{**{k: v for k, v in m.items() if k != "thinking"}, "reasoning_content": m.get("thinking")}
                    if m.get("thinking") else m for m in request["messages"]]
        ours = tokenizer.apply_chat_template(messages, tools=request.get("tools"), tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
        same_text_but_json_spacing(ours, theirs)
    # ollama finds the tags its parsers need, so it offers the model tools and thinking and parses both back out
    assert rendered["tool_tag"] == "<tool_call>" and rendered["thinking_tags"] == ["<think>", "</think>"]


# ---- llama.cpp itself --------------------------------------------------------------------------------------


def llama_cpp_greedy(path, prompt_ids, new_tokens, text=""):
    """llama.cpp's greedy continuation of `prompt_ids` (argmax of its logits), and its own tokens for `text`."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` "
                                                        "builds it and runs these")
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_cpu_kernels():  # llama.cpp picks its AMX kernels for q8_0 where the CPU has AMX; they crash in some VMs
        params = defaults()
        params.use_extra_bufts = False  # as `llama-cli --no-repack`
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", plain_cpu_kernels):
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        tokens = []
        llm.eval(prompt_ids)
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        return tokens, llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_decodes_the_same_greedy_tokens(case, dtype, tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` builds it")
    model = tiny_model(**CASES[case])
    if dtype == "f16":  # llama.cpp computes with the f16 weights, so compare with tinymind's own f16 weights
        model = model.half().float()
    path = tmp_path / "model.gguf"
    assert write_gguf(model, tokenizer, TOKENIZER, path, dtype) == case.split("_")[0]
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text).input_ids
        ours = fast_generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
        theirs, their_ids = llama_cpp_greedy(path, ids, 12, text)
        assert theirs == ours, (case, dtype, prompt)
        assert their_ids == ids  # llama.cpp tokenizes the chat as tinymind does


def test_llama_cpp_q8_0_keeps_most_greedy_tokens(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` builds it")
    matched = total = 0
    for case in ("llama", "bailingmoe"):
        model = tiny_model(**CASES[case])
        write_gguf(model, tokenizer, TOKENIZER, tmp_path / f"{case}.gguf", "q8_0")
        for prompt in PROMPTS:
            ids = tokenizer(prompt).input_ids
            ours = fast_generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
            theirs, _ = llama_cpp_greedy(tmp_path / f"{case}.gguf", ids, 12)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
            matched, total = matched + same, total + len(ours)
    print(f"q8_0: {matched}/{total} greedy tokens equal before the first difference")
    assert matched >= total // 2


def test_llama_cpp_tokenizes_a_tool_using_chat_as_tinymind_does(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` builds it")
    path = tmp_path / "model.gguf"
    write_gguf(tiny_model(), tokenizer, TOKENIZER, path, "f32")
    messages, tools = chat_messages(TOOL_CHAT, load_tools("calculator").schemas)
    text = render_chat(tokenizer, messages, tools)
    assert "<tool_call>" in text and "<tool_response>" in text and "<think>" in text
    _, their_ids = llama_cpp_greedy(path, tokenizer("x").input_ids, 0, text)
    assert their_ids == tokenizer(text).input_ids


def test_llama_cpp_tokenizes_text_as_a_fitted_tokenizer_does(fitted, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` builds it")
    _, folder = fitted
    fitted_tokenizer = load_tokenizer(folder)
    path = tmp_path / "model.gguf"
    write_gguf(tiny_model(vocab_size=len(fitted_tokenizer)), fitted_tokenizer, folder, path, "f32")
    for text in [*SPLIT_TEXTS, "".join(SPLIT_TEXTS), "  leading spaces\tand tabs 42 4242 ，，。"]:
        _, their_ids = llama_cpp_greedy(path, fitted_tokenizer("x").input_ids, 0, text)
        assert their_ids == fitted_tokenizer(text).input_ids, text
