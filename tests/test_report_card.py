"""scripts/report_card.py: one row per run folder, in pipeline order, with its log's figures, task scores that
equal lm-eval's own, and the repetition figure counted by hand."""

import csv
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_jsonl
from model import TinyMindForCausalLM, save_weights
from scripts import report_card

CHOICES = [{"question": f"问题{i}：", "choices": ["甲。", "乙。", "丙。", "丁。"], "answer": i % 4} for i in range(4)]
SUMS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4)]]


def fake_run(out_dir, folder, name, rows):
    torch.manual_seed(len(name))
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1))
    (out_dir / folder).mkdir(parents=True)
    save_weights(model.state_dict(), model.config, out_dir / folder / f"{name}.pth")
    with open(out_dir / folder / f"{name}_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_card_has_a_row_per_stage_in_pipeline_order_with_its_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tasks/*.yaml read data/tasks/ where the command runs
    for task in report_card.CHOICE_TASKS:
        write_jsonl(tmp_path / f"data/tasks/{task}.jsonl", CHOICES)
    for task in (*report_card.CHAT_TASKS, *report_card.TOOL_TASKS):
        write_jsonl(tmp_path / f"data/tasks/{task}.jsonl", SUMS)
    out = tmp_path / "output/demo"
    fake_run(out, "sft_dense", "sft_64", [{"step": 0, "tokens": 0, "seconds": 0, "val_bits_per_byte": 3.0},
                                          {"step": 9, "tokens": 900, "seconds": 4.5, "val_bits_per_byte": 2.5}])
    fake_run(out, "pretrain_dense", "pretrain_64", [{"step": 5, "tokens": 500, "seconds": 2.0, "val_bits_per_byte": ""}])
    (tmp_path / "prompts.txt").write_text("你好\nHi\n")
    text = report_card.report(out, limit=10, prompts_file=tmp_path / "prompts.txt", seed=0)
    stages = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "_dense" in line]
    assert stages == ["| pretrain_dense", "| sft_dense"] * 2  # the stage table, then the task table
    assert "| sft_dense | 900 | 4 | bits per byte 3 → 2.5 |" in text
    assert "| pretrain_dense | 500 | 2 | — |" in text
    task_row = [line for line in text.splitlines() if line.startswith("| pretrain_dense | ")][1]
    assert task_row.count("—") == 4  # no chat tasks for the pretrained model, and no repetition figure

    model, tokenizer = report_card.load_for_use(out / "sft_dense/sft_64.pth")
    replies = report_card.answers(model, tokenizer, ["你好", "Hi"])
    sft_scores = [line for line in text.splitlines() if line.startswith("| sft_dense | ")][1]
    assert sft_scores.endswith(f" | {report_card.repeated_share(replies):.3f} |")


@pytest.mark.parametrize("replies, share", [([[1, 2, 3, 4, 1, 2, 3, 4]], 1 / 5), ([[1, 2, 3]], 0.0),
                                            ([[5, 5, 5, 5, 5, 5], [1, 2, 3, 4]], 2 / 4)])
def test_the_repetition_figure_is_the_share_of_repeated_four_grams(replies, share):
    assert report_card.repeated_share(replies) == pytest.approx(share)


def test_seed_spread_gives_each_runs_gain_and_their_mean_and_deviation(tmp_path, capsys, monkeypatch):
    from scripts import seed_spread

    runs = []
    for seed, (before, after) in enumerate([(0.4, 0.5), (0.4, 0.7)]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "grpo_128_log.csv").write_text(f"step,reward,val_accuracy\n0,,{before}\n10,0.5,\n20,0.6,{after}\n")
        runs.append(str(run))
    monkeypatch.setattr("sys.argv", ["seed_spread", *runs])
    seed_spread.main()
    out = capsys.readouterr().out
    assert "seed0: 0.400 → 0.500 (+0.100)" in out and "seed1: 0.400 → 0.700 (+0.300)" in out
    assert "mean of 2: 0.400 ± 0.000 → 0.600 ± 0.141; change +0.200 ± 0.141" in out

    # --tool_task: the starting weights scored once, each run's final weights after it
    scored = []

    def task_scores(model, tokenizer, tasks, chat, tools, limit, seed):
        scored.append(model)
        return {tasks[0]: (0.5 + 0.1 * len(scored), None)}

    for run in runs:
        (Path(run) / "grpo_128.pth").write_bytes(b"")
    monkeypatch.setattr(seed_spread, "load_for_use", lambda path: (path, None))
    monkeypatch.setattr(seed_spread, "task_scores", task_scores)
    monkeypatch.setattr("sys.argv", ["seed_spread", *runs, "--tool_task", str(tmp_path / "start.pth")])
    seed_spread.main()
    out = capsys.readouterr().out
    assert [Path(path).name for path in scored] == ["start.pth", "grpo_128.pth", "grpo_128.pth"]
    assert "held-out tinymind_calculator with the calculator: before → after" in out
    assert "mean of 2: 0.600 ± 0.000 → 0.750 ± 0.071; change +0.150 ± 0.071" in out
