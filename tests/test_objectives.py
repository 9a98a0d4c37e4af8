"""The loop runs any objective: a DPO-shaped one (two forwards per pair, a frozen reference model, its own
batch type) trains through the real loop with accumulation and resumes bit-exactly."""

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from dataset import Batch, PretrainDataset, collate
from trainer import Loss, Objective, Stage, run_cli, train_stage

from conftest import TINY, pretrain_file


class PairBatch:
    """What the loop needs of a batch: its rows (`len`) and `.to(device)`."""

    def __init__(self, chosen, rejected):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self):
        return len(self.chosen)

    def to(self, device):
        return PairBatch(self.chosen.to(device), self.rejected.to(device))


class TextPairs(PretrainDataset):
    """Sample i pairs text i (chosen) with text i+1 (rejected)."""

    def __len__(self):
        return super().__len__() - 1

    def __getitem__(self, index):
        return super().__getitem__(index), super().__getitem__(index + 1)

    @property
    def lengths(self):
        lengths = super().lengths
        return [max(a, b) for a, b in zip(lengths[:-1], lengths[1:])]

    def collate(self, pairs):
        return PairBatch(collate([c for c, _ in pairs], self.pad_id), collate([r for _, r in pairs], self.pad_id))


def sequence_logp(model, batch: Batch):
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    per_token = -F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
    return (per_token * batch.loss_mask).sum(dim=1)


class PairPreference(Objective):
    """−log σ(β·margin) per pair against a frozen copy of the starting model, averaged over the step's pairs."""

    metrics = ("accuracy",)

    def __init__(self, model, beta=0.5):
        self.reference, self.beta = copy.deepcopy(model), beta
        self.frozen = (self.reference,)

    def units(self, batch):
        return len(batch)

    def __call__(self, model, batch, step):
        with torch.no_grad():
            reference = sequence_logp(self.reference, batch.chosen) - sequence_logp(self.reference, batch.rejected)
        margin = sequence_logp(model, batch.chosen) - sequence_logp(model, batch.rejected) - reference
        loss = -F.logsigmoid(self.beta * margin).sum() / step.units
        accuracy = (margin > 0).float().sum() / step.units
        tokens = batch.chosen.tokens + batch.rejected.tokens
        return Loss(loss, tokens, {"accuracy": accuracy})


def train_pairs(tmp_path, capsys, *flags):
    stage = Stage(name="pairs", description="", dataset=TextPairs, default_data=str(tmp_path / "pretrain.jsonl"),
                  default_val="none", make_objective=lambda model, args, start, tokenizer: PairPreference(model))
    argv = [*TINY, "--device", "cpu", "--save_interval", 2, "--out_dir", tmp_path / "output", *flags]
    code = 0
    try:
        run_cli(lambda: train_stage(stage, argv=argv))
    except SystemExit as stop:
        code = stop.code
    assert code == 0, capsys.readouterr().err
    return torch.load(tmp_path / "output/pairs_dense/pairs_64.pth", weights_only=True)


def log_rows(tmp_path):
    with open(tmp_path / "output/pairs_dense/pairs_64_log.csv") as f:
        return list(csv.DictReader(f))


def test_a_dpo_shaped_objective_trains_with_accumulation_and_resumes_bit_exactly(tmp_path, capsys):
    pretrain_file(tmp_path, copies=2)
    accumulated = ["--batch_size", 2, "--accumulation_steps", 2, "--learning_rate", 2e-3]
    straight = train_pairs(tmp_path / "straight", capsys, *accumulated, "--max_steps", 6, "--data_path",
                           tmp_path / "pretrain.jsonl")
    rows = log_rows(tmp_path / "straight")
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at first
    assert float(rows[-1]["loss"]) < math.log(2) and float(rows[-1]["accuracy"]) > 0.5

    train_pairs(tmp_path / "resumed", capsys, *accumulated, "--max_steps", 6, "--data_path",
                tmp_path / "pretrain.jsonl", "--save_interval", 3)
    (tmp_path / "resumed/output/pairs_dense/pairs_64_resume_00000006.pt").unlink()  # back to step 3
    resumed = train_pairs(tmp_path / "resumed", capsys, *accumulated, "--max_steps", 6, "--data_path",
                          tmp_path / "pretrain.jsonl", "--save_interval", 3, "--resume")
    assert "resumed pairs_64_resume_00000003.pt" in capsys.readouterr().err
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [row["loss"] for row in log_rows(tmp_path / "resumed")] == [row["loss"] for row in rows]


def test_accumulated_pairs_equal_one_large_batch(tmp_path, capsys):
    pretrain_file(tmp_path, copies=1)
    data = ["--data_path", tmp_path / "pretrain.jsonl", "--max_steps", 2, "--learning_rate", 1e-2]
    train_pairs(tmp_path / "whole", capsys, "--batch_size", 4, *data)
    train_pairs(tmp_path / "split", capsys, "--batch_size", 1, "--accumulation_steps", 4, *data)
    whole, split = log_rows(tmp_path / "whole"), log_rows(tmp_path / "split")
    assert float(whole[1]["loss"]) != pytest.approx(math.log(2), abs=1e-3)  # the second step has a margin
    for a, b in zip(whole, split):  # the same mean loss and the same gradient, however the pairs were split
        for name in ("loss", "accuracy", "grad_norm"):
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-6), name
