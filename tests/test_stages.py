"""The three stage scripts end to end, the loop's loss bookkeeping, the CSV log and perplexity."""

import argparse
import csv
import math
import re

import pytest
import torch

from dataset import LENGTH_GROUP_STEPS, PretrainDataset, SFTDataset, epoch_order
from model import TinyMindConfig, TinyMindForCausalLM, load_model, save_weights
from model import model as model_module
from trainer.flags import add_model_flags, add_training_flags, model_config, new_parser, parse
from trainer import PRETRAIN_SHORT_PLAN, UserError
from trainer.stages import stage_parser
from trainer.loop import Trainer
from trainer.run_folder import run_paths
import trainer.objectives
from trainer.objectives import LanguageModeling

from conftest import MODEL, ROOT, TINY, copy_output, pretrain_file, pretrain_stage, run_stage, sft_file


def tiny_args(tmp_path, *extra):
    parser = new_parser("test")
    add_model_flags(parser)
    add_training_flags(parser, default_data=str(tmp_path / "pretrain.jsonl"))
    return parse(parser, [*TINY, "--out_dir", str(tmp_path / "output"), "--device", "cpu", *map(str, extra)])


def test_pretrain_sft_eval_chain_moe(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    sft_file(tmp_path / "data")
    moe = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2"]
    pre = run_stage("1-pretrain.py", *TINY, *moe, "--max_steps", "3", cwd=tmp_path)
    weights = tmp_path / "output/pretrain_moe/pretrain_64_moe.pth"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert "active per token" in pre.stdout

    sft = run_stage("2-sft.py", *TINY, *moe, "--max_steps", "2", cwd=tmp_path)
    assert "initialised from output/pretrain_moe/pretrain_64_moe.pth" in sft.stdout
    assert (tmp_path / "output/sft_moe/sft_64_moe.pth").is_file()
    header = (tmp_path / "output/sft_moe/sft_64_moe_log.csv").read_text().splitlines()[0].split(",")
    assert header[:9] == ["step", "tokens", "seconds", "loss", "ce", "aux", "lr", "grad_norm", "tokens_per_s"]
    assert {f"load_l{layer}_e{expert}" for layer in range(2) for expert in range(4)} <= set(header)

    chat = run_stage("3-eval.py", *MODEL, *moe, "--prompt", "你好", "--max_new_tokens", "5", "--temperature", "0",
                     cwd=tmp_path)
    assert "loaded output/sft_moe/sft_64_moe.pth" in chat.stderr
    assert "tokens/s" in chat.stderr
    missing = run_stage("3-eval.py", *MODEL, *moe, "--prompts_file", "prompts.txt", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        "error: --prompts_file prompts.txt: no such file (one prompt a line)")
    (tmp_path / "prompts.txt").write_text("\n  \n")
    empty = run_stage("3-eval.py", *MODEL, *moe, "--prompts_file", "prompts.txt", cwd=tmp_path, check=False)
    assert empty.returncode == 2 and empty.stderr.strip().splitlines()[-1] == (
        "error: --prompts_file prompts.txt: no prompt in it (one prompt a line)")


def test_missing_pretrain_checkpoint_falls_back_to_random_init(tmp_path):
    (tmp_path / "data").mkdir()
    sft_file(tmp_path / "data")
    result = run_stage("2-sft.py", *TINY, "--max_steps", "1", cwd=tmp_path)
    assert "no output/pretrain_dense/pretrain_64.pth" in result.stdout
    assert "starting from random init" in result.stdout
    assert (tmp_path / "output/sft_dense/sft_64.pth").is_file()


def test_init_from_a_hugging_face_directory_keeps_what_no_flag_sets(tmp_path):
    """A stock Llama with its own rope_theta, norm eps, FFN width and an untied head trains as itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    config = LlamaConfig(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    stock = LlamaForCausalLM(config).eval()
    stock.save_pretrained(tmp_path / "llama")
    run_stage("1-pretrain.py", *TINY, "--max_steps", "1", "--learning_rate", "0", "--embedding_lr", "0", "--head_lr", "0",
              "--init_from", "llama", cwd=tmp_path)
    trained = load_model(tmp_path / "output/pretrain_dense/pretrain_64.pth").eval()
    c = trained.config
    assert (c.rope_theta, c.rms_norm_eps, c.intermediate_size, c.tie_word_embeddings) == (10000.0, 1e-6, 128, False)
    ids = torch.randint(3, 6400, (2, 12))
    with torch.no_grad():  # a zero learning rate leaves the weights as they were: the same function
        torch.testing.assert_close(trained(ids).logits, stock(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_fresh_run_never_overwrites_an_earlier_one(tmp_path, pretrained):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    copy_output(pretrained, tmp_path)
    weights = tmp_path / "output/pretrain_dense/pretrain_64.pth"
    before = weights.read_bytes()
    result = run_stage("1-pretrain.py", *TINY, "--max_steps", "1", "--seed", "7", cwd=tmp_path, check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "holds an earlier pretrain_64 run (up to step 1)" in error and "--resume" in error
    assert weights.read_bytes() == before


def test_mismatched_init_from_names_the_keys(tmp_path, pretrained):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    copy_output(pretrained, tmp_path)
    result = run_stage("1-pretrain.py", *TINY, "--model_type", "moe", "--max_steps", "1",
                       "--init_from", "output/pretrain_dense/pretrain_64.pth", cwd=tmp_path, check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: output/pretrain_dense/pretrain_64.pth does not fit this model")
    assert "mlp.gate.weight" in error and "--model_type" in error


def one_step_loss(tmp_path, tokenizer, batch_size, accumulation_steps, *flags, objective=None):
    data = pretrain_file(tmp_path, copies=1)
    args = tiny_args(tmp_path, "--batch_size", batch_size, "--accumulation_steps", accumulation_steps,
                     "--max_steps", 1, "--data_path", data, *flags)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(model_config(args))
    dataset = PretrainDataset(data, tokenizer, args.max_seq_len)
    trainer = Trainer(model, dataset, objective or LanguageModeling(), args, run_paths("pretrain", args))
    batches = [dataset.collate([dataset[i] for i in range(j, j + batch_size)]) for j in range(0, 4, batch_size)]
    trainer.optimizer_step(batches)
    stats = trainer.read_steps()
    return stats, model


def test_embedding_and_head_rates_follow_the_schedule_scaled_to_their_own_peaks(tmp_path, tokenizer):
    torch.manual_seed(0)
    before = TinyMindForCausalLM(model_config(tiny_args(tmp_path, "--tie_word_embeddings", "false"))).state_dict()
    stats, model = one_step_loss(tmp_path, tokenizer, 2, 1, "--tie_word_embeddings", "false", "--learning_rate", 0.002,
                                 "--embedding_lr", 0.5, "--head_lr", 0.01, "--weight_decay", 0)
    scale = stats["lr"] / 0.002  # where the schedule stands at this step
    assert 0 < scale <= 1
    after = model.state_dict()
    # AdamW's first step moves every weight with a gradient by its rate (m / sqrt(v) is ±1), so the largest move
    # in each table is that table's rate
    for name, peak in (("model.embed_tokens.weight", 0.5), ("lm_head.weight", 0.01),
                       ("model.layers.0.self_attn.q_proj.weight", 0.002)):
        moved = (after[name] - before[name]).abs().max().item()
        assert moved == pytest.approx(peak * scale, rel=1e-3), name


def test_muon_takes_its_momentum_normuon_and_polar_express_from_the_flags_within_range(tmp_path):
    from model.muon import POLAR_EXPRESS, QUINTIC
    from trainer.loop import make_optimizers

    model = TinyMindForCausalLM(model_config(tiny_args(tmp_path)))
    for flags, expected in (((), (0.95, 0.0, QUINTIC)),
                            (("--muon_momentum", 0.85, "--normuon", "--polar_express"), (0.85, 0.95, POLAR_EXPRESS))):
        muon = make_optimizers(model, tiny_args(tmp_path, "--optimizer", "muon", *flags))[1]
        assert [(group["momentum"], group["row_beta2"], group["ns_coefficients"])
                for group in muon.param_groups] == [expected]
    with pytest.raises(UserError, match=r"^--muon_momentum 1.0: must be at least 0 and below 1"):
        tiny_args(tmp_path, "--muon_momentum", 1)
    for flag in ("--normuon", "--polar_express"):
        with pytest.raises(UserError, match=rf"^{flag}: .* this run's optimizer is adamw; pass --optimizer muon"):
            tiny_args(tmp_path, "--optimizer", "adamw", flag)
    from trainer.stages import describe_optimizer

    said = describe_optimizer(argparse.Namespace(args=pretrain_args("--normuon", "--polar_express"), warmup_steps=1))
    assert said.startswith("optimizer: NorMuon (Polar Express) on the blocks' matrices, AdamW on the rest, peak lr 0.006")


def test_a_head_rate_without_an_untied_head_is_refused(tmp_path, tokenizer):
    with pytest.raises(UserError, match="--head_lr: this run trains no weights of an untied LM head"):
        one_step_loss(tmp_path, tokenizer, 2, 1, "--head_lr", 0.01)


def test_each_optimizer_step_moves_the_balancing_bias_by_the_steps_loads(tmp_path, tokenizer, monkeypatch):
    from trainer.metrics import ExpertLoadWatch

    taken = []
    take_counts = ExpertLoadWatch.take_counts
    monkeypatch.setattr(ExpertLoadWatch, "take_counts", lambda self, device: taken.append(take_counts(self, device))
                        or taken[-1])
    _, model = one_step_loss(tmp_path, tokenizer, 2, 2, "--model_type", "moe", "--expert_bias_rate", "0.01",
                             "--aux_loss_alpha", "0", "--norm_topk_prob", "false")
    (loads,) = taken
    assert loads.sum() > 0
    for moe, counts in zip(model.moe_layers(), loads):  # from zero: up for the experts under the mean, down above
        torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(counts.mean() - counts))
        assert moe.expert_bias.any() and not moe.expert_counts.any()


def test_a_skipped_step_changes_nothing_not_even_the_balancing_bias(tmp_path, tokenizer, monkeypatch):
    real = trainer.objectives.masked_cross_entropy
    monkeypatch.setattr(trainer.objectives, "masked_cross_entropy",
                        lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    flags = ("--model_type", "moe", "--expert_bias_rate", "0.01", "--aux_loss_alpha", "0", "--optimizer", "muon")
    torch.manual_seed(0)
    before = TinyMindForCausalLM(model_config(tiny_args(tmp_path, *flags))).state_dict()
    stats, model = one_step_loss(tmp_path, tokenizer, 2, 1, *flags)
    assert math.isnan(stats["loss"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_accumulated_loss_equals_unaccumulated(tmp_path, tokenizer):
    whole, whole_model = one_step_loss(tmp_path / "a", tokenizer, batch_size=4, accumulation_steps=1)
    split, split_model = one_step_loss(tmp_path / "b", tokenizer, batch_size=1, accumulation_steps=4)
    # The four samples have different numbers of real tokens: a per-micro-batch mean would differ.
    assert split["ce"] == pytest.approx(whole["ce"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    for a, b in zip(whole_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def counting(calls, function):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return counted


@pytest.mark.parametrize("flag", ["--grad_checkpointing", "--compile true"])
def test_memory_and_speed_flags_train_the_same_step(flag, tmp_path, tokenizer, monkeypatch):
    plain, plain_model = one_step_loss(tmp_path / "a", tokenizer, 2, 2, "--model_type", "moe")
    calls = []  # the flag's path ran: blocks through torch.utils.checkpoint, or forwards through the compiled model
    if flag == "--grad_checkpointing":
        monkeypatch.setattr(model_module, "checkpoint", counting(calls, model_module.checkpoint))
    else:
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda module, **options: counting(calls, real_compile(module, **options)))
    other, other_model = one_step_loss(tmp_path / "b", tokenizer, 2, 2, "--model_type", "moe", *flag.split())
    assert len(calls) == (2 * other_model.config.num_hidden_layers if flag == "--grad_checkpointing" else 2)
    assert other["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert other["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    for a, b in zip(plain_model.parameters(), other_model.parameters()):
        # AdamW's first step divides each gradient by its own size: rounding in a near-zero one shows here.
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logged_loss_is_the_true_step_mean(tmp_path, tokenizer):
    stats, model = one_step_loss(tmp_path, tokenizer, batch_size=2, accumulation_steps=2)
    dataset = PretrainDataset(tmp_path / "pretrain.jsonl", tokenizer, 48)
    torch.manual_seed(0)
    fresh = TinyMindForCausalLM(model.config)  # the same init the trainer's model had before its step
    total, count = 0.0, 0
    for input_ids, targets, mask in (dataset[i] for i in range(4)):  # each sample alone, unpadded
        losses = torch.nn.functional.cross_entropy(fresh(input_ids[None]).logits[0], targets, reduction="none")
        total, count = total + (losses * mask).sum().item(), count + int(mask.sum())
    expected = total / count
    assert stats["ce"] == pytest.approx(expected, rel=1e-5)


def test_z_loss_adds_its_weight_times_the_mean_squared_log_normaliser(tmp_path, tokenizer):
    plain, _ = one_step_loss(tmp_path / "a", tokenizer, 2, 2)
    stats, model = one_step_loss(tmp_path / "b", tokenizer, 2, 2, objective=LanguageModeling(z_loss=1e-2))
    dataset = PretrainDataset(tmp_path / "b" / "pretrain.jsonl", tokenizer, 48)
    torch.manual_seed(0)
    fresh = TinyMindForCausalLM(model.config).double()  # the trainer's model before its step, in float64
    total, count = 0.0, 0
    for input_ids, _, mask in (dataset[i] for i in range(4)):
        log_z = torch.logsumexp(fresh(input_ids[None]).logits[0], dim=-1)
        total, count = total + (log_z.square() * mask).sum().item(), count + int(mask.sum())
    assert stats["z"] == pytest.approx(total / count, rel=1e-5)
    assert stats["ce"] == pytest.approx(plain["ce"], rel=1e-6)
    assert stats["loss"] == pytest.approx(stats["ce"] + 1e-2 * stats["z"], rel=1e-6)


@pytest.mark.parametrize("flag, words", [(("--z_loss", "1e-4"), "--z_loss: only the language-modelling stages"),
                                         (("--pack", "shared"), "--pack shared: only text and chat samples are packed")])
def test_a_shared_flag_the_stage_has_no_use_for_is_refused_before_any_data_is_read(tmp_path, flag, words):
    result = run_stage("5-dpo.py", *TINY, *flag, "--max_steps", "1", cwd=tmp_path, check=False)  # no data here
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_ppl_data_reports_perplexity_and_bits_per_byte_of_the_answers(tmp_path, tokenizer, sft_trained):
    (tmp_path / "data").mkdir()
    sft = sft_file(tmp_path / "data")
    copy_output(sft_trained, tmp_path)
    checkpoint = tmp_path / "output/sft_dense/sft_64.pth"
    result = run_stage("3-eval.py", *MODEL, "--checkpoint", checkpoint, "--ppl_data", sft, cwd=tmp_path)
    reported = re.search(r": ([\d.]+), bits per byte ([\d.]+)$", result.stdout.strip())

    model = load_model(checkpoint).eval()
    total, count, text_total, text_bytes = 0.0, 0, 0.0, 0
    for input_ids, targets, mask in SFTDataset(sft, tokenizer, 48):  # each sample alone, unpadded
        with torch.no_grad():
            logits = model(input_ids[None]).logits[0]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += (losses * mask).sum().item()
        count += int(mask.sum())
        spells_text = mask.bool() & (targets != tokenizer.eos_token_id)  # the end token spells no text
        text_total += losses[spells_text].sum().item()
        text_bytes += len(tokenizer.decode(targets[spells_text]).encode("utf-8"))
    assert float(reported.group(1)) == pytest.approx(math.exp(total / count), rel=1e-4)
    assert float(reported.group(2)) == pytest.approx(text_total / math.log(2) / text_bytes, rel=1e-4)


def test_csv_log_has_a_row_per_interval(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    run_stage("1-pretrain.py", *TINY, "--max_steps", "4", "--log_interval", "2", cwd=tmp_path)
    with open(tmp_path / "output/pretrain_dense/pretrain_64_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert all(float(row["loss"]) > 0 and float(row["tokens_per_s"]) > 0 for row in rows)
    assert int(rows[1]["tokens"]) > int(rows[0]["tokens"])


def test_eval_interval_logs_held_out_bits_per_byte_into_the_csv(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    result = run_stage("1-pretrain.py", *TINY, "--max_steps", "6", "--log_interval", "4", "--eval_interval", "3",
                       "--val_data", "data/pretrain.jsonl", "--pack", "isolated", "--bigram_steps", "0", cwd=tmp_path)
    with open(tmp_path / "output/pretrain_dense/pretrain_64_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [0, 3, 4, 6]  # before, every 3 steps, every 4th log, the end
    evaluated = [row for row in rows if row["val_bits_per_byte"]]
    assert [int(row["step"]) for row in evaluated] == [0, 3, 6]
    bits = [float(row["val_bits_per_byte"]) for row in evaluated]
    assert bits[-1] < bits[0]  # it learns
    final = re.search(r"held-out bits per byte after pretrain: ([\d.]+)", result.stdout)
    assert float(final.group(1)) == pytest.approx(bits[-1], abs=1e-3)
    seconds = [float(row["seconds"]) for row in rows]
    assert seconds == sorted(seconds) and seconds[0] == 0


def test_config_preset_then_flags_override(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"hidden_size": 96, "batch_size": 3, "learning_rate": 0.01}')
    args = tiny_args(tmp_path, "--config", preset, "--batch_size", 5)
    assert args.batch_size == 5 and args.learning_rate == 0.01
    assert isinstance(args, argparse.Namespace)


def test_safetensors_checkpoints_chain_through_the_stages(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    sft_file(tmp_path / "data")
    run_stage("1-pretrain.py", *TINY, "--max_steps", "1", "--save_format", "safetensors", "--tie_word_embeddings",
              "true", cwd=tmp_path)
    weights = tmp_path / "output/pretrain_dense/pretrain_64.safetensors"
    assert weights.is_file() and not weights.with_suffix(".pth").exists()
    sft = run_stage("2-sft.py", *TINY, "--max_steps", "1", cwd=tmp_path)
    assert "initialised from output/pretrain_dense/pretrain_64.safetensors" in sft.stdout
    model = load_model(weights)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_epoch_order_is_a_permutation_in_steps_of_similar_length():
    lengths = torch.randint(1, 256, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    per_step = 8
    order = epoch_order(lengths, seed=1, epoch=0, samples_per_step=per_step)
    assert sorted(order) == list(range(len(lengths)))
    assert order == epoch_order(lengths, seed=1, epoch=0, samples_per_step=per_step)
    assert order != epoch_order(lengths, seed=1, epoch=1, samples_per_step=per_step)
    window = per_step * LENGTH_GROUP_STEPS
    steps = [order[i:i + per_step] for i in range(0, len(order), per_step)]
    # every step stays inside one window of the shuffled order, and only the very last step is short
    assert all(len(step) == per_step for step in steps[:-1]) and len(steps[-1]) == len(lengths) % per_step
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1 * 1_000_003)).tolist()
    window_of = {sample: position // window for position, sample in enumerate(shuffled)}
    assert all(len({window_of[sample] for sample in step}) == 1 for step in steps)

    def padded_slots(order):
        return sum(max(lengths[i] for i in order[s:s + per_step]) * per_step for s in range(0, len(order), per_step))

    assert padded_slots(order) < 0.6 * padded_slots(shuffled)


def test_safetensors_keeps_an_untied_head(tmp_path):
    config = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(config).eval()
    torch.nn.init.normal_(model.lm_head.weight)  # unlike the embedding
    save_weights(model.state_dict(), config, tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors").eval()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    ids = torch.randint(3, 6400, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_schedules_warm_up_then_end_at_a_tenth(schedule):
    from trainer.loop import lr_at

    rates = [lr_at(step, 100, 5, 1.0, schedule) for step in range(100)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and rates[-1] == pytest.approx(0.1, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))  # never rises after warmup
    assert lr_at(9, 10, 1, 1.0, schedule) == pytest.approx(0.1, abs=1e-12)  # a short run ends there too
    if schedule == "wsd":  # flat at the peak until the last 20% of the steps, then a straight line down
        assert rates[5:79] == [1.0] * 74 and rates[89] == pytest.approx(0.1 + 0.9 * 10 / 20)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_warmup_that_ends_on_the_second_last_step_still_ends_at_the_final_rate(schedule):
    from trainer.loop import lr_at

    assert [lr_at(step, 2, 1, 1.0, schedule) for step in range(2)] == pytest.approx([1.0, 0.1])
    assert [lr_at(step, 4, 3, 1.0, schedule) for step in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.1])


def test_a_warmup_as_long_as_the_run_is_refused_in_one_line(tmp_path):
    from trainer.loop import plan_steps

    assert plan_steps(tiny_args(tmp_path, "--max_steps", 4, "--warmup_steps", 3), 100, 1) == (4, 3)
    for warmup in (4, 10):
        with pytest.raises(UserError, match=rf"^--warmup_steps {warmup}: the run has 4 steps; warm up over fewer"):
            plan_steps(tiny_args(tmp_path, "--max_steps", 4, "--warmup_steps", warmup), 100, 1)
    assert plan_steps(tiny_args(tmp_path, "--max_steps", 1), 100, 1) == (1, 1)  # the default: 2%, at least 1


def test_an_epoch_plans_the_steps_of_the_samples_every_process_takes(tmp_path):
    from trainer.loop import plan_steps

    args = tiny_args(tmp_path, "--epochs", 2, "--batch_size", 2, "--accumulation_steps", 2)
    for samples, world_size in ((9, 2), (17, 2), (16, 2), (11, 3), (5, 1), (7, 4)):
        # as step_batches takes them: the order cut to a multiple of world_size, every world_size-th sample each
        per_process = len(range(samples - samples % world_size)[::world_size])
        steps = math.ceil(per_process / (args.batch_size * args.accumulation_steps))
        assert plan_steps(args, samples, world_size) == (2 * steps, 1), (samples, world_size)
    with pytest.raises(UserError, match=r"^the training data has 3 samples, fewer than the 4 processes: each needs "
                                        r"one at least; add data or run fewer processes$"):
        plan_steps(tiny_args(tmp_path, "--max_steps", 5), 3, 4)


def test_warmdown_over_the_last_decay_fraction_of_the_steps(tmp_path):
    from trainer.loop import lr_at

    rates = [lr_at(step, 100, 0, 1.0, "wsd", decay_fraction=0.65) for step in range(100)]
    assert rates[:35] == [1.0] * 35 and rates[35] < 1.0 and rates[-1] == pytest.approx(0.1)
    assert rates[66] == pytest.approx(0.1 + 0.9 * 33 / 65)
    with pytest.raises(UserError, match=r"^--decay_fraction 0\.0: must lie in \(0, 1\]$"):
        tiny_args(tmp_path, "--decay_fraction", "0")


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_schedule_ends_at_the_final_lr_fraction_of_the_peak(schedule, tmp_path):
    from trainer.loop import lr_at

    rates = [lr_at(step, 100, 0, 2.0, schedule, final_fraction=0.0) for step in range(100)]
    assert rates[0] == 2.0 and rates[-1] == pytest.approx(0.0, abs=1e-12)  # nanochat's decay to zero
    if schedule == "wsd":
        assert rates[89] == pytest.approx(2.0 * 10 / 20)
    with pytest.raises(UserError, match=r"^--final_lr_fraction 1\.5: must lie in \[0, 1\] \(default 0\.1\)$"):
        tiny_args(tmp_path, "--final_lr_fraction", "1.5")


def test_zero_init_out_starts_every_block_as_the_identity_and_still_learns(tmp_path):
    from trainer.stages import new_model

    model = new_model(tiny_args(tmp_path, "--zero_init_out"))
    outputs = {name: p for name, p in model.named_parameters() if name.endswith(("o_proj.weight", "down_proj.weight"))}
    assert len(outputs) == 2 * model.config.num_hidden_layers and all(not p.any() for p in outputs.values())
    assert all(p.any() for name, p in model.named_parameters() if name not in outputs)
    ids = torch.randint(3, 97, (2, 8))
    hidden, _ = model.model(ids, None, None, None)
    torch.testing.assert_close(hidden, model.model.norm(model.model.embed_tokens(ids)))  # the blocks add nothing
    model(ids, labels=ids).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in outputs.values())
    assert not new_model(tiny_args(tmp_path)).model.layers[0].self_attn.o_proj.weight.eq(0).all()


def test_init_by_width_sets_each_table_to_nanochats_scale_and_refuses_a_tied_head(tmp_path):
    from trainer.stages import new_model

    torch.manual_seed(0)
    model = new_model(tiny_args(tmp_path, "--init", "width", "--tie_word_embeddings", "false", "--value_embeds", "true"))
    width = model.config.hidden_size
    for name, parameter in model.named_parameters():
        if name.endswith("_proj.weight") or ".value_embeds." in name:
            assert parameter.abs().max() <= (3 / width) ** 0.5, name  # uniform within sqrt(3) std
            assert parameter.std().item() == pytest.approx(width ** -0.5, rel=0.1), name
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    gates = [p for name, p in model.named_parameters() if "ve_gate" in name]
    assert gates and not any(p.any() for p in gates)  # value embeddings still start at a gate of 1
    ids = torch.randint(3, 97, (2, 8))
    loss = model(ids, labels=ids).loss
    assert loss.item() == pytest.approx(math.log(model.config.vocab_size), rel=0.01)  # a head of 0.001: near uniform
    with pytest.raises(UserError, match=r"^--init width .* add --tie_word_embeddings false$"):
        new_model(tiny_args(tmp_path, "--init", "width", "--tie_word_embeddings", "true"))
    normal = new_model(tiny_args(tmp_path))
    assert normal.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_is_a_model_flag_that_reaches_the_config_and_is_checked(tmp_path):
    assert model_config(tiny_args(tmp_path, "--dropout", "0.1")).dropout == 0.1
    assert model_config(tiny_args(tmp_path)).dropout == 0.0
    with pytest.raises(UserError, match=r"^--dropout 1\.0: must lie in \[0, 1\)$"):
        tiny_args(tmp_path, "--dropout", "1.0")


def pretrain_args(*argv):
    """The flags as 1-pretrain.py parses them: its own defaults, then a preset, then the command line."""
    return parse(stage_parser(pretrain_stage()), ["--device", "cpu", *argv])


@pytest.mark.parametrize("preset", ["small", "moe", "minimind2_768", "minimind3_moe_768"])
def test_a_shape_preset_keeps_the_pretraining_recipe(preset):
    args = pretrain_args("--config", ROOT / f"configs/{preset}.json")
    assert (args.optimizer, args.learning_rate, args.pack, args.pack_fit) == ("muon", 6e-3, "shared", "best")
    # MiniMind's shapes keep its tied head, so its released weights load into a model these presets make
    assert args.tie_word_embeddings == preset.startswith("minimind")


def test_the_learning_benchmarks_default_is_1_pretrains_and_its_best_recipe():
    from scripts.bench_learning import MODEL as BENCH_MODEL, RECIPES, stage_for

    def without_given(args):
        return {key: value for key, value in vars(args).items() if key != "given_flags"}

    def recipe(name):  # as the benchmark runs it: 1-pretrain's defaults for `default`, the flags alone for the rest
        return without_given(parse(stage_parser(stage_for(name)), ["--device", "cpu", *BENCH_MODEL, *RECIPES[name]]))

    assert recipe("default") == recipe("best") == without_given(pretrain_args(*BENCH_MODEL))
    # ...and a short plan starts warm in `default`, as in 1-pretrain.py, and never in `best`
    assert stage_for("default").short_plan == PRETRAIN_SHORT_PLAN and not stage_for("best").short_plan
    assert {**recipe("best"), "bigram_steps": 40, "embedding_lr": 0.003, "head_lr": 1e-3} == recipe("warm_start")
    assert recipe("muon_wsd")["pack"] == "none" and recipe("muon_wsd")["learning_rate"] == 2e-3


def test_a_tied_embedding_trains_at_the_runs_rate_unless_its_own_is_given(tmp_path):
    data = pretrain_file(tmp_path)
    said = {}
    for name, flags in (("cold", ["--bigram_steps", "0"]), ("tied", ["--tie_word_embeddings", "true"]),
                        ("tied_own", ["--tie_word_embeddings", "true", "--embedding_lr", "0.05"])):
        result = run_stage("1-pretrain.py", *TINY, "--max_steps", "1", "--data_path", data, "--out_dir",
                           tmp_path / name, *flags, cwd=tmp_path)
        said[name] = next(line for line in result.stdout.splitlines() if line.startswith("optimizer:"))
    assert "peak lr 0.006, embedding lr 0.1," in said["cold"]
    assert "embedding lr" not in said["tied"]
    assert "peak lr 0.006, embedding lr 0.05," in said["tied_own"]


def test_fsdp_falls_back_to_adamw_at_adamws_rate_unless_a_rate_is_given(capsys):
    assert (pretrain_args("--fsdp").optimizer, pretrain_args("--fsdp").learning_rate) == ("adamw", 5e-4)
    assert "AdamW at lr 0.0005 instead of the default Muon" in capsys.readouterr().err
    assert pretrain_args("--fsdp", "--learning_rate", "1e-3").learning_rate == 1e-3


def test_adamw_asked_of_a_muon_stage_takes_adamws_rate_unless_a_rate_is_given(capsys):
    assert pretrain_args("--optimizer", "adamw").learning_rate == 5e-4
    assert "--optimizer adamw: AdamW at lr 0.0005, not this stage's 0.006 (Muon's)" in capsys.readouterr().err
    assert pretrain_args("--optimizer", "adamw", "--learning_rate", "1e-3").learning_rate == 1e-3


def test_a_run_says_its_optimizer_and_rate_first(pretrained):
    # (a plan this short starts warm, its tables at rates of their own)
    assert ("optimizer: Muon on the blocks' matrices, AdamW on the rest, peak lr 0.006, embedding lr 0.003, head lr "
            "0.001, 1 warmup step, warmup-stable-decay to 0.1 x lr") in (pretrained / "stdout.txt").read_text().splitlines()[:5]


def test_a_stages_own_flag_may_stand_in_a_preset(tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text('{"hidden_size": 64, "my_flag": 0.5}')
    parser = new_parser("test")
    add_model_flags(parser)
    parser.add_argument("--my_flag", type=float, default=0.1)
    assert parse(parser, ["--device", "cpu", "--config", preset]).my_flag == 0.5


def test_compile_alone_means_true_and_takes_a_value(tmp_path):
    assert tiny_args(tmp_path, "--compile").compile is True
    assert tiny_args(tmp_path, "--compile", "false").compile is False
    assert tiny_args(tmp_path).compile is False  # on a CPU


@pytest.mark.parametrize("script, flags, words", [
    ("4-lora.py", ["--lora_rank", "0"], "error: --lora_rank 0: must be at least 1"),
    ("6-grpo.py", ["--num_iterations", "0"], "error: --num_iterations 0: must be at least 1"),
    ("7-distill.py", ["--teacher", "none.pth", "--alpha", "2"], "error: --alpha 2.0 must lie in [0, 1]"),
])
def test_a_stage_checks_its_own_flags_before_anything_is_read(tmp_path, script, flags, words):
    result = run_stage(script, *TINY, *flags, cwd=tmp_path, check=False)  # no data, no checkpoint here
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(words)


def test_a_later_stage_fits_the_tokenizer_to_the_vocabulary_of_the_weights_it_starts_from(tmp_path):
    from dataset import load_tokenizer

    larger = load_tokenizer()  # more tokens than the default --vocab_size of 6,400
    larger.add_tokens([f"<extra_{i}>" for i in range(100)])
    larger.save_pretrained(tmp_path / "larger")
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    sft_file(tmp_path / "data")
    run_stage("1-pretrain.py", *TINY, "--vocab_size", 6528, "--tokenizer_path", "larger", "--max_steps", 1,
              cwd=tmp_path)
    result = run_stage("2-sft.py", *TINY, "--max_steps", 1, cwd=tmp_path)  # the weights' 6,528, not the flag's 6,400
    assert "tokenizer: output/pretrain_dense/tokenizer (6,500 tokens)" in result.stdout
    refused = run_stage("1-pretrain.py", *TINY, "--tokenizer_path", "larger", "--max_steps", 1, "--out_dir", "other",
                        cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: the tokenizer larger has 6500 tokens but --vocab_size is 6400; pass --vocab_size 6500 or more")
