"""The bigram warm start: the data's bigram counts, the loss fitted to them, and a run that starts from them."""

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TEXTS, pretrain_file, pretrain_stage, run_stage, sft_file, tiny_config, write_jsonl
from dataset import Packed, PretrainDataset, SFTDataset
from model import TinyMindForCausalLM
from trainer.bigram import bigram_counts, bigram_loss, warm_start


@pytest.mark.parametrize("kind", ["pretrain", "packed", "sft"])
def test_token_pairs_are_the_targets_the_samples_train(tmp_path, tokenizer, kind):
    if kind == "sft":
        data = SFTDataset(sft_file(tmp_path), tokenizer, 48)
    else:  # max_length 16 splits the longer texts into several samples
        data = PretrainDataset(pretrain_file(tmp_path), tokenizer, 16)
        data = Packed(data, isolated=False, best_fit=True) if kind == "packed" else data
    inputs, following = [], []
    for index in range(len(data)):
        ids, targets, mask = data[index][:3]
        inputs.append(ids[mask.bool()])
        following.append(targets[mask.bool()])
    previous, after = data.token_pairs()
    assert sorted(zip(previous.tolist(), after.tolist())) == sorted(zip(torch.cat(inputs).tolist(),
                                                                        torch.cat(following).tolist()))


def test_bigram_counts_count_each_pair_and_a_token_cap_takes_the_first_samples(tmp_path, tokenizer):
    data = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": "ab ab ab"}, {"text": "zz"}]), tokenizer, 48)
    previous, after = data.token_pairs()
    keys, counts = np.unique(previous * 10_000 + after, return_counts=True)
    rows, columns, counted = bigram_counts(data, 10_000)
    assert rows.tolist() == (keys // 10_000).tolist() and columns.tolist() == (keys % 10_000).tolist()
    assert counted.tolist() == counts.tolist() and torch.all(rows[1:] >= rows[:-1])  # sorted by token
    lengths = data.stored_lengths
    assert len(data.token_pairs(max_tokens=1)[0]) in {n - 1 for n in lengths}  # one whole document's, chosen
    assert len(data.token_pairs(max_tokens=lengths.sum())[0]) == len(previous)  # at random when not all fit


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_bigram_loss_and_its_gradient_match_the_cross_entropy_of_each_counted_pair(softcap):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(tie_word_embeddings=False, logit_softcap=softcap))
    previous = torch.tensor([3, 3, 3, 5, 9, 9])
    following = torch.tensor([1, 4, 7, 7, 2, 96])
    counts = torch.tensor([2.0, 1.0, 5.0, 1.0, 3.0, 1.0])
    rows, previous_rows = torch.unique_consecutive(previous, return_inverse=True)
    first_pair = torch.searchsorted(previous_rows, torch.arange(len(rows) + 1)).tolist()
    loss = bigram_loss(model, rows, first_pair, previous_rows, following, counts, counts.sum())
    ours = [p.grad.clone() for p in (model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight)]
    model.zero_grad()
    # Independently: the model's own output path with the blocks left out, each pair's CE weighted by its count.
    logits = model.lm_head(model.model.norm(model.model.embed_tokens(previous)))
    logits = softcap * torch.tanh(logits / softcap) if softcap else logits
    expected = (F.cross_entropy(logits, following, reduction="none") * counts).sum() / counts.sum()
    expected.backward()
    theirs = [p.grad for p in (model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight)]
    assert torch.allclose(loss, expected.detach(), rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours, theirs))


def held_out_loss(model, data):
    model.eval()
    with torch.no_grad():
        batch = data.collate([data[i] for i in range(len(data))])
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
        return float((ce * batch.loss_mask.flatten()).sum() / batch.loss_mask.sum())


@pytest.mark.parametrize("tied", [False, True])
def test_the_warm_start_predicts_the_next_token_better_than_random_init(tmp_path, tokenizer, tied):
    data = PretrainDataset(pretrain_file(tmp_path), tokenizer, 48)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=len(tokenizer), tie_word_embeddings=tied))
    blocks = {name: p.clone() for name, p in model.named_parameters() if ".layers." in name}
    before = held_out_loss(model, data)
    seconds = warm_start(model, data, 30, "cpu")
    after = held_out_loss(model, data)
    assert seconds > 0 and after < before - 1.0, (before, after)  # nats a token, on its own training text
    assert all(torch.equal(p, blocks[name]) for name, p in model.named_parameters() if ".layers." in name)
    assert all(p.grad is None for p in model.parameters())


def test_a_run_with_the_warm_start_counts_its_time_and_starts_lower(tmp_path):
    pretrain_file(tmp_path / "data")
    write_jsonl(tmp_path / "data/val.jsonl", [{"text": t} for t in TEXTS])
    flags = [*TINY, "--max_steps", 2, "--val_data", "data/val.jsonl", "--eval_interval", 1]
    runs = {}
    for steps in (0, 20):
        run_stage("1-pretrain.py", *flags, "--bigram_steps", steps, "--out_dir", f"out{steps}", cwd=tmp_path)
        with open(tmp_path / f"out{steps}/pretrain_dense/pretrain_64_log.csv") as f:
            runs[steps] = list(csv.DictReader(f))
    cold, warm = runs[0][0], runs[20][0]  # step 0: the held-out figures before the first step
    assert float(warm["seconds"]) > float(cold["seconds"]) == 0
    assert float(warm["val_bits_per_byte"]) < float(cold["val_bits_per_byte"]) - 0.5


def test_the_warm_start_is_refused_for_a_model_that_starts_from_weights(tmp_path, pretrained):
    result = run_stage("2-sft.py", *TINY, "--init_from", pretrained / "output/pretrain_dense/pretrain_64.pth",
                       "--bigram_steps", 5, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "error: --bigram_steps" in result.stderr and "starts from" in result.stderr


@pytest.mark.parametrize("flags, samples, warm", [
    ([], 200 * 4, True),  # 4 rows a step: 200 steps, the longest short plan
    ([], 200 * 4 + 1, False),  # 201 steps
    (["--epochs", "2"], 100 * 4, True),  # two passes of 100 steps: the plan's steps decide
    (["--epochs", "2"], 101 * 4, False),
    (["--max_steps", "50"], 10**6, True),  # a short plan over a large corpus
    (["--bigram_steps", "0"], 100, False),  # any of the rule's flags given: the run is as given
    (["--embedding_lr", "0.1"], 100, False),
    (["--head_lr", "6e-3"], 100, False),
    (["--tie_word_embeddings", "true"], 100, False),  # the measured recipe fits an untied head
])
def test_a_short_plan_from_random_init_starts_warm_unless_a_flag_says_otherwise(flags, samples, warm):
    from trainer.flags import model_config, parse
    from trainer.stages import PRETRAIN_SHORT_PLAN, stage_parser, start_short_plan
    stage = pretrain_stage()
    args = parse(stage_parser(stage), ["--device", "cpu", *TINY, *flags])
    before = dict(vars(args))
    start_short_plan(stage, args, model_config(args), samples)
    assert vars(args) == ({**before, **PRETRAIN_SHORT_PLAN} if warm else before)


def test_1_pretrain_with_a_short_plan_says_it_starts_warm_and_its_tables_train_slowly(tmp_path):
    pretrain_file(tmp_path / "data")
    result = run_stage("1-pretrain.py", *TINY, "--max_steps", 2, cwd=tmp_path)
    assert "a short plan (2 steps, at most 200) starts warm: --bigram_steps 40 --embedding_lr 0.003 --head_lr 0.001" \
        in result.stdout
    assert "bigram warm start:" in result.stdout and "embedding lr 0.003, head lr 0.001" in result.stdout
    # Started from trained weights, a run has nothing to warm up: SFT from it says nothing of the kind
    sft_file(tmp_path / "data")
    sft = run_stage("2-sft.py", *TINY, "--max_steps", 1, cwd=tmp_path)
    assert "short plan" not in sft.stdout and "bigram" not in sft.stdout
