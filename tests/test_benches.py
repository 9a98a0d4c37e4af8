"""The stage and serving benchmarks and the GPU check run end to end on tiny settings and report every contender."""

import json

import pytest

from conftest import CONVERSATIONS, MODEL, ROOT, free_port, run_stage, sft_file, write_jsonl


@pytest.mark.slow  # a benchmark end to end, not a unit
def test_bench_stages_reports_every_stage_against_full_sft(tmp_path, capsys):
    from scripts import bench_stages

    sft = sft_file(tmp_path)
    pairs = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "No."}]} for c in CONVERSATIONS * 2]
    dpo = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    bench_stages.main([*MODEL, "--vocab_size", 6400, "--batch_size", 2, "--data_path", sft, "--dpo_data", dpo,
                       "--repeats", 1, "--warmup", 0, "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    rows = {name: line for line in table for name in bench_stages.CONTENDERS if line.startswith(name + "  ")}
    assert set(rows) == set(bench_stages.CONTENDERS)
    assert rows["full SFT"].count(" 1.00x ") == 2 and "100.00%" in rows["full SFT"]
    lora_share = float(rows["LoRA"].split()[-1].rstrip("%"))
    assert 0 < lora_share < 20


def test_bench_learning_races_recipes_to_the_references_final_with_a_fitted_tokenizer(tmp_path):
    data, val = learning_data(tmp_path)
    result = run_stage("-m", "scripts.bench_learning", "--budget", "0.5", "--repeats", "1", "--evaluations", "2",
                       "--val_samples", "8", "--calibration_steps", "6", "--data", data, "--val", val,
                       "--fit_tokenizer", "--reference", "nanochat", "--recipes", "best_vocab_2048@0.25", "nanochat",
                       "--time_tolerance", "1", "--out", tmp_path / "curve.png", cwd=ROOT, timeout=600)
    out = result.stdout
    assert "a row of fixed length carries" in out and (tmp_path / "curve.png").is_file()
    assert "shape: hidden 128 × 4 layers, batch 16 × 256" in out  # the benchmark's own
    # a tokenizer fitted for each vocabulary size the recipes use
    assert "training a 2048-token BPE" in out and "training a 6400-token BPE" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["nanochat", "best_vocab_2048@0.25"]  # the reference first
    assert rows["nanochat"][-1] == "1.00x |"  # it reaches its own final at its last second


def learning_data(tmp_path):
    texts = [f"Line {i}: to be, or not to be, that is the question; 床前明月光。" for i in range(400)]
    return (write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in texts[:360]]),
            write_jsonl(tmp_path / "pretrain_val.jsonl", [{"text": t} for t in texts[360:]]))


def test_bench_learning_races_at_a_presets_shape_retrains_a_run_off_its_budget_and_refuses_width_128s(tmp_path):
    data, val = learning_data(tmp_path)
    preset = {"model_type": "moe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_seq_len": 64, "batch_size": 4}  # the vocabulary: 1-pretrain's
    (tmp_path / "shape.json").write_text(json.dumps(preset))
    race = ["-m", "scripts.bench_learning", "--budget", "0.5", "--repeats", "1", "--evaluations", "2", "--val_samples",
            "8", "--calibration_steps", "6", "--data", data, "--val", val, "--config", tmp_path / "shape.json",
            "--reference", "muon_wsd", "--out", tmp_path / "curve.png"]
    result = run_stage(*race, "--recipes", "default", "--time_tolerance", "0", cwd=ROOT, timeout=600)
    assert "shape: hidden 64 × 2 layers MoE, batch 4 × 64" in result.stdout
    # no run ends exactly at its budget: each is trained again with the step time it measured
    assert [line.split(":")[0] for line in result.stdout.splitlines() if "; trained again with " in line] == [
        "round 1, muon_wsd", "round 1, default"]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].strip("| ") for row in rows[1:]] == ["muon_wsd", "default"]  # under the header
    refused = run_stage(*race, "--recipes", "nanochat", cwd=ROOT, check=False)
    assert refused.returncode == 2
    assert "--recipes nanochat: its flags hold at width 128 only" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # a benchmark end to end, not a unit
def test_bench_serve_reports_throughput_and_time_to_first_token(capsys):
    from scripts import bench_serve

    bench_serve.main([*MODEL, "--vocab_size", 6400, "--concurrency", "1,2", "--tokens", 4, "--rounds", 1,
                      "--port", free_port(), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("clients"))) + 1:]
    *table, ceiling = table
    assert [line.split()[0] for line in table] == ["2,", "1", "2"]
    assert all(float(line.split()[-4]) > 0 for line in table)  # aggregate tokens/s
    gain = float(ceiling.split("at most ")[1].split("x")[0])  # the decode step's own batching gain at --max_batch 8
    assert ceiling.startswith("the decode step alone") and 0 < gain < 8 * 3


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path, capsys):
    from scripts import gpu_check

    gpu_check.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "rows.json")])
    rows = {row["check"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    trained = [f"train {kind} {mode} {optimizer}" for kind in ("dense", "moe") for mode in ("eager", "compiled")
               for optimizer in ("adamw", "muon")]
    assert all(rows[name]["tokens/s"] > 0 and rows[name]["MFU %"] >= 0 for name in trained)
    assert "flash_attention" in rows["SDPA kernel, training shapes"]["note"]
    assert "attention" in rows["SDPA kernel, --pack isolated"]["note"]  # the kernel under a document mask, named
    assert all("same tokens: True" in rows[f"decode batch {batch}, 16 tokens"]["note"] for batch in (1, 8))
    assert rows["1-pretrain.py --model_type moe --config configs/moe.json, 4 steps"]["tokens/s"] > 0  # the log's
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1  # a header and a line per row


@pytest.mark.slow
def test_bench_lm_eval_and_bench_sampling_report_every_contender(tmp_path, capsys, monkeypatch):
    import torch

    from model import TinyMindForCausalLM, save_weights
    from scripts import bench_lm_eval, bench_sampling
    from conftest import tiny_config

    monkeypatch.chdir(tmp_path)  # tasks/*.yaml read data/tasks/ where the command runs
    write_jsonl(tmp_path / "data/tasks/tinymind_idiom_meaning.jsonl",
                [{"question": f"问{i}：", "choices": ["甲", "乙", "丙", "丁"], "answer": i % 4} for i in range(3)])
    write_jsonl(tmp_path / "data/tasks/tinymind_arithmetic.jsonl", [{"question": "What is 1 + 2?", "answer": "3"}])
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400))
    save_weights(model.state_dict(), model.config, tmp_path / "tiny.pth")
    bench_lm_eval.main([*MODEL, "--checkpoint", tmp_path / "tiny.pth", "--tasks", "tinymind_idiom_meaning",
                        "--limit", 3, "--rounds", 1])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tinymind_idiom")]
    assert [row[1] for row in rows] == ["tinymind", "hf"] and rows[0][-2] == rows[1][-2]  # the same accuracy
    (tmp_path / "prompts.txt").write_text("你好\n")
    monkeypatch.setattr(bench_sampling, "SETTINGS", bench_sampling.SETTINGS[:2])
    bench_sampling.main([*MODEL, "--checkpoint", tmp_path / "tiny.pth", "--samples", 2, "--limit", 1,
                         "--prompts_file", tmp_path / "prompts.txt"])
    table = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:3] for row in table] == [["0.0", "1.0", "1.0"], ["0.6", "0.85", "1.0"]]
    assert all(0 <= float(row[3]) <= 1 and 0 <= float(row[4]) <= 1 for row in table)
