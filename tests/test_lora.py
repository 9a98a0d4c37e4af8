"""4-lora.py: adapters train alone, merge exactly, load unmerged in 3-eval and onto the stock Llama export."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from model import fast_generate, load_model
from model.convert import export_hf
from trainer.lora import load_adapter

from conftest import MODEL, TINY, copy_output, run_stage, sft_file

MOE = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2"]


def train_lora(directory, *flags, sft_run=None):
    """LoRA on the SFT data from an SFT checkpoint: the shared run `sft_run`'s, or one trained here with `flags`."""
    sft_file(directory / "data")
    if sft_run is None:
        run_stage("2-sft.py", *TINY, *flags, "--max_steps", 2, cwd=directory)
    else:
        copy_output(sft_run, directory)
    return run_stage("4-lora.py", *TINY, *flags, "--max_steps", 4, "--learning_rate", 1e-2, "--data_path",
                     "data/sft.jsonl", cwd=directory)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, sft_trained):
    directory = tmp_path_factory.mktemp("lora")
    result = train_lora(directory, sft_run=sft_trained)
    return directory, result


def ids():
    return torch.randint(3, 6400, (2, 11), generator=torch.Generator().manual_seed(0))


def test_base_plus_adapter_equals_the_merged_checkpoint_and_only_adapters_trained(dense_run):
    directory, result = dense_run
    assert "trainable parameters of" in result.stdout and "the base weights stay frozen" in result.stdout
    base = load_model(directory / "output/sft_dense/sft_64.pth")
    merged = load_model(directory / "output/lora_dense/lora_64.pth").eval()
    adapted = load_adapter(load_model(directory / "output/sft_dense/sft_64.pth"), directory / "output/lora_dense/lora_64")
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(ids()).logits, merged(ids()).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base.eval()(ids()).logits, merged(ids()).logits, atol=1e-3)  # it learned

    state = torch.load(sorted((directory / "output/lora_dense").glob("*_resume_*.pt"))[-1], weights_only=True)
    base_state = base.state_dict()
    trained = [key for key in state["model"] if "lora_" in key]
    assert trained and all(key.endswith(("lora_A.default.weight", "lora_B.default.weight")) for key in trained)
    for key, value in state["model"].items():
        if "lora_" not in key:  # every base weight bit-identical to the SFT checkpoint it started from
            plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base_state[plain]), key
    assert any(value.abs().sum() > 0 for key, value in state["model"].items() if "lora_B" in key)


def test_adapter_loads_with_peft_onto_the_stock_llama_export(dense_run, tmp_path):
    directory, _ = dense_run
    export_hf(load_model(directory / "output/sft_dense/sft_64.pth"), tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(llama).__name__ == "LlamaForCausalLM"
    adapted = PeftModel.from_pretrained(llama, str(directory / "output/lora_dense/lora_64")).eval()
    merged = load_model(directory / "output/lora_dense/lora_64.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids()).logits, merged(ids()).logits, atol=1e-4, rtol=1e-4)


def test_eval_with_lora_decodes_what_the_merged_checkpoint_decodes(dense_run):
    directory, _ = dense_run
    merged = load_model(directory / "output/lora_dense/lora_64.pth").eval()
    adapted = load_adapter(load_model(directory / "output/sft_dense/sft_64.pth"), directory / "output/lora_dense/lora_64")
    prompt = ids()[:1, :6]
    assert torch.equal(fast_generate(adapted.get_base_model().eval(), prompt, 12), fast_generate(merged, prompt, 12))
    chat = run_stage("3-eval.py", *MODEL, "--lora", "output/lora_dense/lora_64", "--prompt", "你好",
                     "--temperature", 0, "--max_new_tokens", 8, cwd=directory)
    plain = run_stage("3-eval.py", *MODEL, "--checkpoint", "output/lora_dense/lora_64.pth", "--prompt", "你好",
                      "--temperature", 0, "--max_new_tokens", 8, cwd=directory)
    assert "with the LoRA adapter" in chat.stderr and chat.stdout == plain.stdout


def test_moe_adapters_reach_routed_and_shared_experts_but_not_the_router(tmp_path):
    train_lora(tmp_path, *MOE)
    state = torch.load(sorted((tmp_path / "output/lora_moe").glob("*_resume_*.pt"))[-1], weights_only=True)
    adapted = {key.split(".lora_")[0] for key in state["model"] if "lora_A" in key}
    assert any(".experts.3.down_proj" in key for key in adapted)
    assert any(".shared_experts.0.gate_proj" in key for key in adapted)
    assert not any(key.endswith("mlp.gate") for key in adapted)
    assert (tmp_path / "output/lora_moe/lora_64_moe.pth").is_file()


def test_lora_without_an_sft_checkpoint_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "data").mkdir()
    sft_file(tmp_path / "data")
    result = run_stage("4-lora.py", *TINY, "--max_steps", 1, "--data_path", "data/sft.jsonl", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no output/sft_dense/sft_64.pth: lora starts from a trained model; run the sft stage first or pass "
        "--init_from PATH")
    assert not (tmp_path / "output").exists()  # said before anything was made


def test_a_resumed_lora_run_keeps_its_adapters_shape_or_says_which_flag_to_pass(tmp_path, sft_trained):
    sft_file(tmp_path / "data")
    copy_output(sft_trained, tmp_path)
    lora = [*TINY, "--data_path", "data/sft.jsonl", "--save_interval", 1]
    run_stage("4-lora.py", *lora, "--lora_rank", 4, "--max_steps", 2, cwd=tmp_path)
    result = run_stage("4-lora.py", *lora, "--max_steps", 3, "--resume", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --resume: --lora_rank is 8 but the run in output/lora_dense used 4; pass --lora_rank 4 or start a "
        "new run without --resume")
    run_stage("4-lora.py", *lora, "--lora_rank", 4, "--max_steps", 3, "--resume", cwd=tmp_path)
