"""model/convert.py and scripts/convert_hf.py: tinymind ↔ stock transformers with the same logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it on import: nothing here may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM, MixtralConfig,
    MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
)

from model import TinyMindConfig, TinyMindForCausalLM, save_weights  # noqa: E402
from model.convert import UnsupportedArchitecture, export_hf, load_hf, names_hf_model  # noqa: E402
from dataset import load_tokenizer, tokenizer_beside  # noqa: E402
from scripts import train_tokenizer  # noqa: E402
from scripts.convert_hf import main as convert_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "model" / "tokenizer"
TEXTS = [
    "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？",
]

# A larger init than the default 0.02 gives trained-like activations and decisive routing,
# so a wrong factor anywhere moves the logits far past the tolerance.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
CASES = {
    "dense": ({}, "LlamaForCausalLM"),
    "dense_qk_norm": (dict(qk_norm=True), "Qwen3ForCausalLM"),
    "moe": (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0), "MixtralForCausalLM"),
    "moe_unnormalised": (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                              norm_topk_prob=False), "Qwen2MoeForCausalLM"),
    "moe_shared": (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2),
                   "Qwen2MoeForCausalLM"),
    "moe_top1": (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0), "MixtralForCausalLM"),
    "moe_qk_norm": (dict(use_moe=True, qk_norm=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0),
                    "Qwen3MoeForCausalLM"),
    # MiniMind-3's MoE: top-1 with the weight renormalised to 1, no shared expert, q/k norms
    "moe_minimind3": (dict(use_moe=True, qk_norm=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0),
                      "Qwen3MoeForCausalLM"),
    "dense_yarn": (dict(qk_norm=True, rope_scaling=TinyMindConfig.yarn(4, 8)), "Qwen3ForCausalLM"),
    # nanochat's feed-forward activation, in the gated form transformers computes as hidden_act "relu2"
    "dense_relu2": (dict(hidden_act="relu2"), "LlamaForCausalLM"),
    "moe_relu2": (dict(use_moe=True, hidden_act="relu2", n_routed_experts=4, num_experts_per_tok=2,
                       n_shared_experts=1), "Qwen2MoeForCausalLM"),
}


@pytest.fixture(scope="module")
def tokens():
    """A batch of real text cut to one length (no padding), through the project tokenizer when it exists."""
    if (TOKENIZER / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        rows = [tokenizer(text).input_ids for text in TEXTS]
        return torch.tensor([row[: min(map(len, rows))] for row in rows]), len(tokenizer)
    return torch.randint(0, 512, (len(TEXTS), 16), generator=torch.Generator().manual_seed(0)), 512


def tiny_model(vocab_size, **fields):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(**TINY, vocab_size=vocab_size, **fields)).eval()
    with torch.no_grad():  # norm gains unlike 1, so a norm mapped to the wrong place moves the logits
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(1.0, 0.2)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_stock_transformers_with_the_same_logits_and_import_restores_it(case, tokens, tmp_path):
    ids, vocab_size = tokens
    fields, architecture = CASES[case]
    model = tiny_model(vocab_size, **fields)

    assert export_hf(model, tmp_path) == architecture
    written = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in written and written["rope_theta"] == model.config.rope_theta
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(stock).__name__ == architecture
    difference = (logits(stock, ids) - logits(model, ids)).abs().max().item()
    print(f"{case}: max |logit difference| {difference:.2e}")
    assert difference < 1e-4
    assert torch.equal(greedy(stock, ids), greedy(model, ids))

    back = load_hf(tmp_path).eval()
    assert back.config.to_dict() == {**model.config.to_dict(), "dtype": back.config.to_dict()["dtype"]}
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, back.state_dict()[key]) for key, value in model.state_dict().items())
    assert torch.equal(logits(back, ids), logits(model, ids))


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["weight_1", "router_probability"])
def test_single_expert_routing_with_a_shared_expert_exports_with_the_same_logits(norm_topk_prob, tokens, tmp_path):
    ids, vocab_size = tokens
    model = tiny_model(vocab_size, use_moe=True, num_experts_per_tok=1, n_shared_experts=1,
                       norm_topk_prob=norm_topk_prob)
    export_hf(model, tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(stock, ids) - logits(model, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("yarn", [TinyMindConfig.yarn(4, 8),  # as --yarn_factor writes it
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}],
                         ids=["explicit", "defaults"])
def test_a_yarn_export_also_writes_transformers_4s_rope_scaling_and_transformers_5_computes_the_same(yarn, tokens,
                                                                                                   tmp_path):
    ids, vocab_size = tokens
    assert ids.shape[1] > 8  # past the original length, where YaRN changes the rotary
    model = tiny_model(vocab_size, rope_scaling=yarn)
    export_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {**yarn, "attention_factor": 1.0}
    assert written["rope_parameters"] == {**written["rope_scaling"], "rope_theta": model.config.rope_theta}
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(stock, ids) - logits(model, ids)).abs().max().item() < 1e-4
    assert load_hf(tmp_path).config.rope_scaling == TinyMindConfig.yarn(4, 8)


def test_bfloat16_export_writes_bfloat16_weights(tokens, tmp_path):
    ids, vocab_size = tokens
    model = tiny_model(vocab_size, use_moe=True, n_shared_experts=1)
    export_hf(model, tmp_path, dtype=torch.bfloat16)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert stock.dtype == torch.bfloat16
    assert stock.model.layers[0].mlp.shared_expert_gate.weight.abs().max() > 0  # nonzero, see SHARED_GATE_WEIGHT


def test_stock_llama_with_an_untied_head_imports_with_the_same_logits(tokens, tmp_path):
    ids, vocab_size = tokens
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    stock = LlamaForCausalLM(config).eval()
    stock.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert not model.config.tie_word_embeddings and model.config.rope_theta == 10000.0
    assert (logits(model, ids) - logits(stock, ids)).abs().max().item() < 1e-4


def test_tinymind_directory_loads_through_load_hf_with_its_rotary_table(tokens, tmp_path):
    ids, vocab_size = tokens
    model = tiny_model(vocab_size, use_moe=True)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_hf(tmp_path).eval(), ids), logits(model, ids))


def test_a_logit_softcap_value_embeddings_or_a_balancing_bias_are_refused_naming_the_fix(tokens, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="--logit_softcap 0"):
        export_hf(tiny_model(tokens[1], logit_softcap=15.0), tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="--value_embeds false"):
        export_hf(tiny_model(tokens[1], value_embeds=True), tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="--expert_bias_rate 0"):
        export_hf(tiny_model(tokens[1], use_moe=True, expert_bias_rate=1e-3), tmp_path)


def test_other_architectures_are_refused_naming_the_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="holds gpt2; tinymind reads only LlamaForCausalLM, "
                       "Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM and TinyMind"):
        load_hf(tmp_path)


def test_a_moe_with_qk_norm_and_shared_experts_is_refused_naming_the_fix(tokens, tmp_path):
    _, vocab_size = tokens
    model = tiny_model(vocab_size, use_moe=True, qk_norm=True, n_shared_experts=1)
    with pytest.raises(UnsupportedArchitecture, match="--n_shared_experts 0"):
        export_hf(model, tmp_path)


def test_stock_qwen3_moe_with_yarn_imports_with_the_same_logits(tokens, tmp_path):
    """A Qwen3-MoE as Qwen publishes them (untied head, YaRN without an explicit attention factor)."""
    ids, vocab_size = tokens
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=64, moe_intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True, initializer_range=0.1,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                             "original_max_position_embeddings": 8})
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    stock.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert model.config.qk_norm and model.config.rope_scaling["attention_factor"] > 1
    assert (logits(model, ids) - logits(stock, ids)).abs().max().item() < 1e-4


def test_stock_mixtral_imports_with_the_same_logits(tokens, tmp_path):
    ids, vocab_size = tokens
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    stock = MixtralForCausalLM(MixtralConfig(**shape, num_experts_per_tok=2)).eval()
    stock.save_pretrained(tmp_path / "top2")
    model = load_hf(tmp_path / "top2").eval()
    assert (model.config.n_routed_experts, model.config.n_shared_experts, model.config.intermediate_size) == (4, 0, 96)
    assert (logits(model, ids) - logits(stock, ids)).abs().max().item() < 1e-4


def test_stock_qwen2_moe_with_a_learned_shared_gate_is_refused(tmp_path):
    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=64,
                            shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, vocab_size=64)
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="learned, token-dependent gate"):
        load_hf(tmp_path)


def test_stock_qwen2_moe_without_qkv_biases_imports_with_the_same_logits(tokens, tmp_path):
    ids, vocab_size = tokens
    config = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=64, moe_intermediate_size=48,
                            shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, initializer_range=0.1,
                            qkv_bias=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    stock = Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():  # the constant gate tinymind's shared experts stand for (see SHARED_GATE_WEIGHT)
        for layer in stock.model.layers:
            layer.mlp.shared_expert_gate.weight.fill_(2.0**-64)
    stock.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert (model.config.n_shared_experts, model.config.intermediate_size) == (2, 48)
    assert (logits(model, ids) - logits(stock, ids)).abs().max().item() < 1e-4


def test_cli_unsupported_directory_is_one_line_and_exit_2(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["import", "--model", str(tmp_path), "--out", str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Qwen2MoeForCausalLM" in message


def test_cli_export_of_a_model_no_stock_architecture_computes_is_one_line_and_exit_2(tmp_path, capsys):
    checkpoint, model = tmp_path / "nanochat.pth", tiny_model(6400, value_embeds=True)
    save_weights(model.state_dict(), model.config, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {checkpoint}: value_embeds: no stock transformers "
                                               "architecture adds embeddings to the attention's values; train with "
                                               "--value_embeds false to export")


def test_an_export_replaces_an_earlier_one_whole_and_a_refused_one_leaves_it(tmp_path, capsys):
    checkpoint, model = tmp_path / "sft_64.pth", tiny_model(6400)
    save_weights(model.state_dict(), model.config, checkpoint)
    convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    (tmp_path / "hf" / "from_an_earlier_export.bin").write_bytes(b"stale")
    convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "from_an_earlier_export.bin" not in written and "model.safetensors" in written
    refused = tmp_path / "nanochat.pth"
    save_weights(tiny_model(6400, value_embeds=True).state_dict(), tiny_model(6400, value_embeds=True).config, refused)
    with pytest.raises(SystemExit):
        convert_main(["export", "--checkpoint", str(refused), "--out", str(tmp_path / "hf")])
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not an export")
    with pytest.raises(SystemExit):
        convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "notes")])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --out {tmp_path / 'notes'}: the folder holds files and no earlier export")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "not an export"


def test_an_export_refuses_an_out_that_is_a_file_holds_what_it_reads_or_is_another_models_folder(tmp_path, capsys):
    checkpoint, model = tmp_path / "run" / "sft_64.pth", tiny_model(6400)
    checkpoint.parent.mkdir()
    save_weights(model.state_dict(), model.config, checkpoint)
    (tmp_path / "precious.pth").write_bytes(b"mine")
    stock = tmp_path / "my_llama"  # a model folder of the user's own, with its notes
    LlamaForCausalLM(LlamaConfig(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(stock)
    (stock / "README.md").write_text("my notes")
    convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for source, out, expected in [
        (checkpoint, tmp_path / "precious.pth", "a file is there and an export writes a folder"),
        (checkpoint, tmp_path / "run", f"the export would replace or write into {checkpoint}, which it reads"),
        (stock, stock, f"the export would replace or write into {stock}, which it reads"),
        (stock, stock / "hf", f"the export would replace or write into {stock}, which it reads"),
        (tmp_path / "hf", tmp_path / "hf", f"the export would replace or write into {tmp_path / 'hf'}, which"),
        (checkpoint, stock, "the folder holds files and no earlier export"),  # a config.json is no export's mark
    ]:
        with pytest.raises(SystemExit):
            convert_main(["export", "--checkpoint", str(source), "--out", str(out)])
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --out {out}: {expected}")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_an_export_writes_the_dtype_the_checkpoint_is_stored_in_unless_told(tmp_path):
    model = tiny_model(6400).to(torch.bfloat16)
    checkpoint = tmp_path / "sft_64.safetensors"
    save_weights(model.state_dict(), model.config, checkpoint)

    def exported_dtype(source, out, *flags):
        convert_main(["export", "--checkpoint", str(source), "--out", str(tmp_path / out), *flags])
        return AutoModelForCausalLM.from_pretrained(tmp_path / out).dtype
    assert exported_dtype(checkpoint, "hf") == torch.bfloat16
    assert exported_dtype(tmp_path / "hf", "again") == torch.bfloat16  # a Hugging Face folder: its config's dtype
    assert exported_dtype(checkpoint, "hf32", "--dtype", "float32") == torch.float32


def test_cli_round_trip(tokens, tmp_path):
    """Export as a user runs it (a subprocess), import in-process: each Python start costs seconds."""
    _, vocab_size = tokens
    model = tiny_model(vocab_size, **CASES["moe_shared"][0])
    checkpoint = tmp_path / "pretrain_64_moe.pth"
    torch.save(model.state_dict(), checkpoint)
    model.config.to_json_file(checkpoint.with_suffix(".json"))
    hf_dir = tmp_path / "hf"
    subprocess.run(
        [sys.executable, "-m", "scripts.convert_hf", "export", "--checkpoint", str(checkpoint), "--out", str(hf_dir)],
        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
    )
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.json").is_file()
    if (TOKENIZER / "chat_template.jinja").is_file():
        assert AutoTokenizer.from_pretrained(hf_dir).chat_template

    imported = tmp_path / "imported" / "imported.pth"
    convert_main(["import", "--model", str(hf_dir), "--out", str(imported)])
    state = torch.load(imported, weights_only=True)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    config = TinyMindConfig.from_json_file(imported.with_suffix(".json"))
    assert (config.use_moe, config.n_shared_experts, config.num_experts_per_tok) == (True, 2, 2)
    # The tokenizer travels with the weights, so chat, serving and the stages load the one they were trained with.
    assert tokenizer_beside(imported) == imported.parent / "tokenizer"
    assert load_tokenizer(imported.parent / "tokenizer").get_vocab() == load_tokenizer(hf_dir).get_vocab()


def test_import_refuses_a_model_without_its_tokenizer_and_a_folder_holding_another(tokens, tmp_path, capsys):
    _, vocab_size = tokens
    hf_dir = tmp_path / "hf"
    export_hf(tiny_model(vocab_size), hf_dir)  # weights and config, no tokenizer
    with pytest.raises(SystemExit):
        convert_main(["import", "--model", str(hf_dir), "--out", str(tmp_path / "a" / "m.pth")])
    assert capsys.readouterr().err.strip() == (f"error: {hf_dir} holds no tokenizer.json; pass --tokenizer_path with "
                                               "the tokenizer its weights were trained with")
    assert not (tmp_path / "a").exists()
    convert_main(["import", "--model", str(hf_dir), "--out", str(tmp_path / "a" / "m.pth"), "--tokenizer_path",
                  str(TOKENIZER)])
    assert load_tokenizer(tmp_path / "a" / "tokenizer").get_vocab() == load_tokenizer(TOKENIZER).get_vocab()
    fitted = tmp_path / "fitted"
    train_tokenizer.save(train_tokenizer.train(TEXTS * 20, vocab_size=300), fitted)
    with pytest.raises(SystemExit):
        convert_main(["import", "--model", str(hf_dir), "--out", str(tmp_path / "a" / "n.pth"), "--tokenizer_path",
                      str(fitted)])
    assert "holds another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "a" / "n.pth").exists()


def test_hub_repo_ids_are_told_from_weight_files(tmp_path):
    (tmp_path / "model_dir").mkdir()
    (tmp_path / "w.pth").write_bytes(b"")
    assert names_hf_model(tmp_path / "model_dir")
    assert names_hf_model("Qwen/Qwen2.5-0.5B")  # a dot in a repo id is no file suffix
    assert not names_hf_model(tmp_path / "w.pth")  # an existing file
    assert not names_hf_model("output/pretrain_512.pth")  # a missing weights file, not a repo
    assert not names_hf_model("a/b/c")
    assert not names_hf_model("my runs/sft_512") and not names_hf_model("./sft_512")  # no valid repo ids


def test_a_missing_path_that_is_no_hub_repo_id_is_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"^\./sft_512: no such file or directory, nor an owner/name Hub"):
        load_hf("./sft_512")
    with pytest.raises(SystemExit):
        convert_main(["import", "--model", "my runs/sft_512", "--out", str(tmp_path / "x.pth")])
    assert capsys.readouterr().err.strip() == ("error: my runs/sft_512: no such file or directory, nor an owner/name "
                                               "Hub repo id")
