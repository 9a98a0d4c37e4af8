"""Training that survives: exact resume after SIGKILL, Ctrl-C saves, non-finite steps, and bad input."""

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import model.weights as weights_io
import trainer.objectives
from trainer import Stage, run_cli, train_stage
from dataset import PretrainDataset

from conftest import ROOT, TINY, pretrain_file, run_stage

PRETRAIN = Stage(name="pretrain", description="", dataset=PretrainDataset, packs=True, z_loss=True,
                 default_data="data/pretrain.jsonl", default_val="data/none.jsonl")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_in_process(capsys, *argv):
    """Run 1-pretrain's main in this process; returns (exit code, the stderr lines)."""
    code = 0
    try:
        run_cli(lambda: train_stage(PRETRAIN, argv=[*TINY, "--device", "cpu", *map(str, argv)]))
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def no_partial_files(directory):
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def log_steps(path):
    with open(path) as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def start_pretrain(cwd, out_dir, *extra):
    # The test's own environment (its thread count too, which the bits of a step depend on), as run_stage's; a
    # process group of its own, as a command started from a terminal.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "1-pretrain.py"), *TINY, "--out_dir", out_dir, *map(str, extra)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_resume_state(run_dir, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(run_dir.glob("*_resume_*.pt")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no resume state appeared: {process.communicate()}")


# ---- resume ----------------------------------------------------------------------------------

STEPS = ["--max_steps", 60, "--save_interval", 5, "--log_interval", 1]


def test_sigkill_then_resume_is_bit_identical(workdir):
    run_stage("1-pretrain.py", *TINY, *STEPS, "--out_dir", "straight", cwd=workdir)
    straight = torch.load(workdir / "straight/pretrain_dense/pretrain_64.pth", weights_only=True)

    process = start_pretrain(workdir, "killed", *STEPS)
    run_dir = workdir / "killed/pretrain_dense"
    wait_for_resume_state(run_dir, process)
    time.sleep(random.uniform(0.0, 1.0))
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run_stage("1-pretrain.py", *TINY, *STEPS, "--out_dir", "killed", "--resume", cwd=workdir)

    resumed = torch.load(run_dir / "pretrain_64.pth", weights_only=True)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert log_steps(run_dir / "pretrain_64_log.csv") == list(range(1, 61))
    assert len(list(run_dir.glob("*_resume_*.pt"))) == 2  # --keep_last default
    assert no_partial_files(run_dir)


def test_sigint_saves_and_says_how_to_resume(workdir):
    """Ctrl-C as a terminal sends it: to the trainer and its data-loading workers, which leave it to the trainer."""
    process = start_pretrain(workdir, "output", *STEPS, "--num_workers", 2)
    run_dir = workdir / "output/pretrain_dense"
    wait_for_resume_state(run_dir, process)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "--resume" in err and err.count("SIGINT: saving a checkpoint after this step") == 1
    latest = sorted(run_dir.glob("*_resume_*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    assert 5 <= state["progress"]["step"] < 60
    assert log_steps(run_dir / "pretrain_64_log.csv") == list(range(1, state["progress"]["step"] + 1))
    run_stage("1-pretrain.py", *TINY, *STEPS, "--resume", cwd=workdir)
    assert log_steps(run_dir / "pretrain_64_log.csv") == list(range(1, 61))


def test_resume_with_another_batch_size_names_the_flag(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    code, err = run_in_process(capsys, "--max_steps", 4, "--batch_size", 2, "--resume")
    assert code == 2
    assert err[-1].startswith("error: --resume: --batch_size is 2 but the run in output/pretrain_dense used 4")


def test_a_run_resumes_in_another_precision_its_loss_scale_fresh_or_dropped(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2, "--dtype", "float32")[0] == 0
    assert run_in_process(capsys, "--max_steps", 4, "--dtype", "float16", "--resume")[0] == 0
    latest = sorted((workdir / "output/pretrain_dense").glob("*_resume_*.pt"))[-1]
    assert torch.load(latest, weights_only=True)["scaler"]["scale"] > 0  # float16 kept a loss scale of its own
    assert run_in_process(capsys, "--max_steps", 6, "--dtype", "float32", "--resume")[0] == 0


def test_resume_keeps_the_runs_rate_unless_the_command_line_changes_it(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2, "--learning_rate", 1e-3)[0] == 0
    code, err = run_in_process(capsys, "--max_steps", 4, "--resume")  # the default rate is not the run's
    assert code == 2
    assert err[-1].startswith("error: --resume: the run in output/pretrain_dense used --learning_rate 0.001 and this "
                              "run's default is 0.0005; pass --learning_rate 0.001")
    assert run_in_process(capsys, "--max_steps", 4, "--learning_rate", 5e-4, "--resume")[0] == 0  # said: changed


def test_resume_takes_the_optimizer_settings_from_the_command_line_and_refuses_a_changed_default(workdir, capsys):
    first = ("--max_steps", 2, "--optimizer", "muon", "--muon_momentum", 0.9, "--weight_decay", 0.05,
             "--adam_beta2", 0.99)
    assert run_in_process(capsys, *first)[0] == 0
    code, err = run_in_process(capsys, "--max_steps", 4, "--optimizer", "muon", "--resume")
    assert code == 2 and "used --muon_momentum 0.9 and this run's default is 0.95" in err[-1]
    code, err = run_in_process(capsys, "--max_steps", 4, "--optimizer", "muon", "--muon_momentum", 0.8, "--resume")
    assert code == 2 and "used --weight_decay 0.05 and this run's default is 0.1" in err[-1]
    assert run_in_process(capsys, "--max_steps", 4, "--optimizer", "muon", "--muon_momentum", 0.8, "--weight_decay",
                          0.02, "--adam_beta2", 0.9, "--resume")[0] == 0
    latest = sorted((workdir / "output/pretrain_dense").glob("*_resume_*.pt"))[-1]
    groups = torch.load(latest, weights_only=True)["optimizer"]["param_groups"]
    muon = [group for group in groups if "momentum" in group]
    adamw = [group for group in groups if "betas" in group]
    assert [(group["momentum"], group["weight_decay"]) for group in muon] == [(0.8, 0.02)]
    assert {tuple(group["betas"]) for group in adamw} == {(0.9, 0.9)}  # the saved run's 0.99 is not brought back
    assert sorted(group["weight_decay"] for group in adamw) == [0.0, 0.02]  # matrices decay, norms and biases not


def test_resume_state_without_its_data_order_is_resumed_with_a_warning(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    latest = sorted((workdir / "output/pretrain_dense").glob("*_resume_*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    del state["data_order"]  # as written before the order was recorded
    torch.save(state, latest)
    code, err = run_in_process(capsys, "--max_steps", 4, "--resume")
    assert code == 0
    assert (f"warning: {latest.name} does not record its data order; the rest of this epoch may repeat some "
            f"samples and skip others") in err


def test_resume_that_would_log_other_columns_names_them_and_leaves_the_log(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    log = workdir / "output/pretrain_dense/pretrain_64_log.csv"
    before = log.read_text()
    code, err = run_in_process(capsys, "--max_steps", 4, "--z_loss", 1e-4, "--val_data", "data/pretrain.jsonl",
                               "--resume")
    assert code == 2
    assert err[-1] == ("error: --resume: this run logs other columns than output/pretrain_dense/pretrain_64_log.csv "
                       "holds (adds z, val_perplexity, val_bits_per_byte); resume with the --z_loss and --val_data "
                       "the run began with, or start a new run without --resume")
    assert log.read_text() == before
    assert run_in_process(capsys, "--max_steps", 4, "--val_data", "data/pretrain.jsonl", "--resume")[0] == 2
    assert run_in_process(capsys, "--max_steps", 4, "--resume")[0] == 0  # the same columns: it continues
    assert log_steps(log) == [1, 2, 3, 4]


def test_resume_in_another_save_format_leaves_only_its_weights(workdir, capsys):
    from trainer.run_folder import RunPaths

    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    run_dir = workdir / "output/pretrain_dense"
    assert run_in_process(capsys, "--max_steps", 4, "--save_format", "safetensors", "--resume")[0] == 0
    assert not (run_dir / "pretrain_64.pth").exists()
    assert RunPaths(run_dir, "pretrain_64").existing_weights() == run_dir / "pretrain_64.safetensors"
    latest = torch.load(run_dir / "pretrain_64_resume_00000004.pt", weights_only=True)["model"]
    weights = weights_io.read_state_dict(run_dir / "pretrain_64.safetensors")
    assert all(torch.equal(weights[key], latest[key]) for key in weights)


def test_resume_with_the_head_in_a_group_of_its_own_continues_its_optimizer_state_exactly(workdir, capsys):
    """Muon takes the blocks' matrices and --embedding_lr the embedding: --head_lr then takes the last matrix from
    AdamW's group of matrices, which must not be left empty (torch.distributed.checkpoint refuses it)."""
    import shutil

    run = ["--max_steps", 4, "--save_interval", 2, "--keep_last", 2, "--optimizer", "muon", "--tie_word_embeddings",
           "false", "--embedding_lr", 1e-3]
    assert run_in_process(capsys, *run, "--out_dir", "straight")[0] == 0
    straight = workdir / "straight/pretrain_dense"
    resumed = workdir / "resumed/pretrain_dense"
    resumed.mkdir(parents=True)
    shutil.copy(straight / "pretrain_64_resume_00000002.pt", resumed)
    # The head's rate as it was (the run's --learning_rate, 5e-4), in a group of its own from step 3.
    assert run_in_process(capsys, *run, "--head_lr", 5e-4, "--out_dir", "resumed", "--resume")[0] == 0
    a = torch.load(straight / "pretrain_64.pth", weights_only=True)
    b = torch.load(resumed / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_resume_past_an_unreadable_state_keeps_the_good_ones(workdir, capsys):
    """The newest state unreadable: the run resumes from the one before, and what it saves next is kept (the
    unreadable one, at a later step, must not count among --keep_last and push the good ones out)."""
    assert run_in_process(capsys, "--max_steps", 4, "--save_interval", 2)[0] == 0
    run_dir = workdir / "output/pretrain_dense"
    (run_dir / "pretrain_64_resume_00000004.pt").write_bytes(b"cut off by a crash")
    code, err = run_in_process(capsys, "--max_steps", 3, "--keep_last", 1, "--resume")  # stopped again at step 3
    assert code == 0 and any("pretrain_64_resume_00000004.pt is unreadable" in line for line in err)
    assert sorted(path.name for path in run_dir.glob("*_resume_*.pt")) == ["pretrain_64_resume_00000003.pt",
                                                                           "pretrain_64_resume_00000004.pt"]
    code, err = run_in_process(capsys, "--max_steps", 6, "--resume")
    assert code == 0 and any("pretrain_64_resume_00000004.pt is unreadable" in line for line in err)


def test_resume_on_other_data_says_the_continuation_is_not_the_runs(workdir, capsys):
    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    data = workdir / "data/pretrain.jsonl"
    data.write_text(data.read_text() + '{"text": "One more document."}\n')
    code, err = run_in_process(capsys, "--max_steps", 4, "--resume")
    assert code == 0 and any(line.startswith("warning: the training data (data/pretrain.jsonl) has ") and
                             "the continuation is not the run's" in line for line in err)
    code, err = run_in_process(capsys, "--max_steps", 6, "--resume")  # the run's data from here on: nothing said
    assert code == 0 and not any("the training data" in line for line in err)


def test_resume_refuses_another_tokenizer_and_leaves_the_runs_own(workdir, capsys):
    from scripts import train_tokenizer

    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    own = workdir / "output/pretrain_dense/tokenizer/tokenizer.json"
    before = own.read_bytes()
    train_tokenizer.save(train_tokenizer.train(["To be, or not to be: that is the question."] * 50, vocab_size=300),
                         workdir / "other")
    code, err = run_in_process(capsys, "--max_steps", 4, "--resume", "--tokenizer_path", "other")
    assert code == 2 and err[-1].startswith("error: --resume: --tokenizer_path other is not the tokenizer the run in")
    assert own.read_bytes() == before
    assert run_in_process(capsys, "--max_steps", 4, "--resume", "--tokenizer_path", ROOT / "model/tokenizer")[0] == 0


def test_resume_without_state_says_so(workdir, capsys):
    code, err = run_in_process(capsys, "--max_steps", 2, "--resume")
    assert code == 2 and "no resume state" in err[-1]
    assert not (workdir / "output").exists()  # said before anything was made


# ---- numerical faults ------------------------------------------------------------------------


def poison_loss(monkeypatch, bad_calls):
    """Make the loss NaN on the given (1-based) calls of masked_cross_entropy inside the loop."""
    real = trainer.objectives.masked_cross_entropy
    calls = {"n": 0}

    def maybe_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(trainer.objectives, "masked_cross_entropy", maybe_nan)


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16 adds the GradScaler's own bookkeeping
def test_nan_loss_skips_the_step(dtype, workdir, capsys, monkeypatch):
    poison_loss(monkeypatch, bad_calls={2})
    code, err = run_in_process(capsys, "--max_steps", 4, "--dtype", dtype)
    assert code == 0
    assert any("non-finite loss" in line and "update skipped (1 so far)" in line for line in err)
    state = torch.load(sorted((workdir / "output/pretrain_dense").glob("*_resume_*.pt"))[-1], weights_only=True)
    assert state["progress"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_nan_between_log_rows_is_said_and_counted_at_the_next_row(workdir, capsys, monkeypatch):
    """The skip is decided on the device; the host hears of it with the next log row's read."""
    poison_loss(monkeypatch, bad_calls={2})
    code, err = run_in_process(capsys, "--max_steps", 4, "--log_interval", 4, "--save_interval", 4)
    assert code == 0
    assert [line for line in err if "skipped" in line] == [
        "steps 1-4: non-finite loss or gradient norm; update skipped (1 so far)"]
    state = torch.load(sorted((workdir / "output/pretrain_dense").glob("*_resume_*.pt"))[-1], weights_only=True)
    assert state["progress"]["skipped_steps"] == 1


class OverflowingGradient(torch.autograd.Function):
    """The loss as it is, its gradient infinite: what float16's loss scaler meets at too high a scale."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_float16_step_the_scaler_skips_leaves_the_routing_bias(workdir, capsys, monkeypatch):
    """An overflow in float16 with a finite loss is the scaler's to skip (not divergence), and the skipped step moves
    nothing, the MoE's balancing bias included."""
    real = trainer.objectives.masked_cross_entropy
    monkeypatch.setattr(trainer.objectives, "masked_cross_entropy",
                        lambda *args, **kwargs: OverflowingGradient.apply(real(*args, **kwargs)))
    code, _ = run_in_process(capsys, "--max_steps", 2, "--dtype", "float16", "--model_type", "moe",
                             "--expert_bias_rate", 0.01, "--bigram_steps", 0)
    assert code == 0
    state = torch.load(sorted((workdir / "output/pretrain_moe").glob("*_resume_*.pt"))[-1], weights_only=True)
    biases = [value for key, value in state["model"].items() if key.endswith("expert_bias")]
    assert biases and all(torch.equal(bias, torch.zeros_like(bias)) for bias in biases)


def test_repeated_nan_stops_and_keeps_the_last_good_checkpoint(workdir, capsys, monkeypatch):
    poison_loss(monkeypatch, bad_calls=set(range(3, 100)))
    code, err = run_in_process(capsys, "--max_steps", 20, "--save_interval", 2)
    assert code == 2
    assert "5 non-finite steps in a row" in err[-1] and "--learning_rate" in err[-1]
    weights = torch.load(workdir / "output/pretrain_dense/pretrain_64.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--batch_size", 0], "--batch_size 0: must be at least 1"),
    (["--learning_rate", -1e-3], "--learning_rate -0.001: must not be negative"),
    (["--max_seq_len", 40000], "--max_seq_len 40000 exceeds max_position_embeddings 32768"),
    (["--hidden_size", 66], "model flags: hidden_size 66 is not a multiple of num_attention_heads 4"),
    (["--tokenizer_path", "no/such/dir"], "no/such/dir"),
    (["--data_path", "data/missing.jsonl"], "data/missing.jsonl"),
])
def test_bad_flags_give_one_clear_line(workdir, capsys, argv, expected):
    code, err = run_in_process(capsys, "--max_steps", 1, *argv)
    assert code == 2
    assert err[-1].startswith("error: ") and expected in err[-1]


def test_unknown_config_key(workdir, capsys):
    (workdir / "preset.json").write_text(json.dumps({"hidden_size": 64, "hiden_layers": 3}))
    code, err = run_in_process(capsys, "--config", "preset.json")
    assert code == 2 and err[-1] == "error: --config preset.json: unknown key 'hiden_layers' (keys are flag names, see --help)"


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", "eight", "'batch_size' is \"eight\", but --batch_size takes a whole number"),
    ("batch_size", 8.5, "'batch_size' is 8.5, but --batch_size takes a whole number"),
    ("learning_rate", "fast", "'learning_rate' is \"fast\", but --learning_rate takes a number"),
    ("out_dir", None, "'out_dir' is null, but --out_dir takes a string"),
    ("model_type", "sparse", "'model_type' is \"sparse\", but --model_type takes \"dense\" or \"moe\""),
    ("grad_checkpointing", 1, "'grad_checkpointing' is 1, but --grad_checkpointing takes true or false"),
])
def test_config_value_the_flag_would_refuse(workdir, capsys, key, value, expected):
    (workdir / "preset.json").write_text(json.dumps({"hidden_size": 64, key: value}))
    code, err = run_in_process(capsys, "--config", "preset.json")
    assert code == 2 and err[-1] == f"error: --config preset.json: {expected}"


def test_config_numbers_may_be_strings_as_on_the_command_line(workdir, capsys):
    (workdir / "preset.json").write_text(json.dumps({"hidden_size": "64", "learning_rate": "1e-3", "max_steps": None}))
    assert run_in_process(capsys, "--config", "preset.json", "--max_steps", 1)[0] == 0


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"),
    (b'{"text": "ok"}\n{"text": oops}\n', "line 2"),
    (b'{"text": "ok"}\n{"body": "no text key"}\n', "line 2"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe bad bytes"}\n', "line 2"),
])
def test_bad_data_names_file_and_line(workdir, capsys, content, expected):
    (workdir / "data/bad.jsonl").write_bytes(content)
    code, err = run_in_process(capsys, "--max_steps", 1, "--data_path", "data/bad.jsonl")
    assert code == 2
    assert "bad.jsonl" in err[-1] and expected in err[-1]


def test_unwritable_out_dir(workdir, capsys):
    (workdir / "a_file").write_text("")
    code, err = run_in_process(capsys, "--max_steps", 1, "--out_dir", "a_file/output")
    assert code == 2 and err[-1].startswith("error: --out_dir a_file/output: cannot write")


def checkpoint_error(workdir, capsys, path):
    code, err = run_in_process(capsys, "--max_steps", 1, "--init_from", path)
    assert code == 2
    return err[-1]


def test_truncated_and_corrupt_checkpoints(workdir, capsys):
    model_state = {"model.norm.weight": torch.ones(64)}
    torch.save(model_state, workdir / "good.pth")
    data = (workdir / "good.pth").read_bytes()
    (workdir / "cut.pth").write_bytes(data[: len(data) // 2])
    (workdir / "noise.pth").write_bytes(b"not a checkpoint at all")
    for name in ("cut.pth", "noise.pth"):
        assert checkpoint_error(workdir, capsys, name).startswith(f"error: {name}: truncated or corrupt checkpoint")
    assert checkpoint_error(workdir, capsys, "absent.pth") == "error: absent.pth: no such checkpoint file"


class Payload:
    pass


def test_pickled_objects_are_refused(workdir, capsys):
    torch.save({"model.norm.weight": torch.ones(64), "extra": Payload()}, workdir / "pickled.pth")
    message = checkpoint_error(workdir, capsys, "pickled.pth")
    assert message.startswith("error: pickled.pth: refused, it holds pickled Python objects")


def test_full_disk_during_save_keeps_the_previous_checkpoint(workdir, capsys, monkeypatch):
    assert run_in_process(capsys, "--max_steps", 2)[0] == 0
    weights = workdir / "output/pretrain_dense/pretrain_64.pth"
    before = weights.read_bytes()

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_io.torch, "save", full_disk)
    code, err = run_in_process(capsys, "--max_steps", 4, "--resume")
    assert code == 2
    assert err[-1] == f"error: could not write {weights.relative_to(workdir)}: No space left on device; " \
                      "the previous file there is untouched"
    assert weights.read_bytes() == before
    assert no_partial_files(workdir / "output")


@pytest.mark.parametrize("suffix, writer, failure", [
    ("safetensors", "save_file", SafetensorError("Error while serializing: I/O error: No space left on device")),
    ("pth", "torch.save", RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                       "writing file data/3: file write failed")),
], ids=["safetensors", "torch.save"])
def test_a_full_disk_in_any_writer_is_one_line_keeping_the_previous_file(tmp_path, monkeypatch, suffix, writer,
                                                                         failure):
    from model import TinyMindConfig, TinyMindForCausalLM

    config = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    weights = tmp_path / f"w.{suffix}"
    weights_io.save_weights(TinyMindForCausalLM(config).state_dict(), config, weights)
    before = weights.read_bytes()

    def full_disk(state, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise failure
    monkeypatch.setattr(weights_io.torch if writer == "torch.save" else weights_io, writer.split(".")[-1], full_disk)
    with pytest.raises(weights_io.CheckpointError) as error:
        weights_io.save_weights(TinyMindForCausalLM(config).state_dict(), config, weights)
    assert str(error.value) == f"could not write {weights}: {failure}; the previous file there is untouched"
    assert weights.read_bytes() == before and no_partial_files(tmp_path)

    def full_disk_in_folder(folder):
        folder.mkdir()
        full_disk(None, folder / "model.safetensors")
    with pytest.raises(weights_io.CheckpointError, match=f"^could not write {tmp_path / 'folder'}: .*; the previous "
                                                         "folder there is untouched$"):
        weights_io.atomic_folder(tmp_path / "folder", full_disk_in_folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", f"w.{suffix}"]


@pytest.mark.parametrize("path, expected", [
    ("absent.pth", "absent.pth: no such checkpoint file"),  # not "no absent.json beside it"
    ("my runs/sft_512", "my runs/sft_512: no such file or directory, nor an owner/name Hub repo id"),
    ("./sft_512", "sft_512: no such file or directory, nor an owner/name Hub repo id"),
])
def test_a_missing_checkpoint_is_one_line_saying_so(workdir, path, expected):
    with pytest.raises(weights_io.CheckpointError) as error:
        weights_io.load_model(path)
    assert str(error.value) == expected


def test_a_folder_left_by_a_crash_between_the_swaps_comes_back_and_a_failed_save_keeps_it(tmp_path):
    from dataset import load_tokenizer, save_tokenizer

    tokenizer, run = load_tokenizer(), tmp_path / "run"
    save_tokenizer(tokenizer, run / "tokenizer")
    (run / "tokenizer").rename(run / ".tokenizer.old")  # a crash after the first rename: the previous folder aside,
    (run / ".tokenizer.tmp").mkdir()  # the new one half written
    (run / ".tokenizer.tmp" / "part").write_bytes(b"partial")

    def full_disk(folder):
        Path(folder).mkdir()
        (Path(folder) / "part").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(weights_io.CheckpointError, match="could not write .*tokenizer: No space left on device; the "
                                                         "previous folder there is untouched"):
        weights_io.atomic_folder(run / "tokenizer", full_disk)
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").encode("床前明月光") == tokenizer.encode("床前明月光")
    save_tokenizer(tokenizer, run / "tokenizer")
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_checkpoint_cut_at_any_length_is_one_line_naming_the_file(tmp_path, suffix):
    from model import TinyMindConfig, TinyMindForCausalLM

    config = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    whole = tmp_path / f"whole.{suffix}"
    weights_io.save_weights(TinyMindForCausalLM(config).state_dict(), config, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    for length in sorted({*range(0, len(data), max(1, len(data) // 300)), *range(0, 64), len(data) - 1}):
        cut.write_bytes(data[:length])
        with pytest.raises(weights_io.CheckpointError, match=f"^{cut}: "):
            weights_io.read_state_dict(cut)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_checkpoint_with_flipped_bytes_is_one_line_naming_the_file_or_loads_unchanged(tmp_path, suffix):
    """No flip goes unnoticed into the weights: every changed byte either gives the one error line or changes
    nothing that is loaded (the zip's alignment padding)."""
    from model import TinyMindConfig, TinyMindForCausalLM

    config = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    whole = tmp_path / f"whole.{suffix}"
    weights_io.save_weights(TinyMindForCausalLM(config).state_dict(), config, whole)
    original = weights_io.read_state_dict(whole)
    data = whole.read_bytes()
    flipped = tmp_path / f"flipped.{suffix}"
    errors = unchanged = 0
    for position in sorted({*range(0, len(data), max(1, len(data) // 300)), *range(0, 200), len(data) - 1}):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        flipped.write_bytes(damaged)
        try:
            state = weights_io.read_state_dict(flipped)
        except weights_io.CheckpointError as err:
            assert str(err).startswith(f"{flipped}: ") and "\n" not in str(err)
            errors += 1
            continue
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state), position
        unchanged += 1
    assert errors > 250


@pytest.mark.parametrize("recipe", [["--optimizer", "muon"], ["--schedule", "wsd", "--adam_beta2", "0.99"]],
                         ids=["muon", "wsd"])
def test_resume_from_a_middle_state_ends_bit_identical(workdir, capsys, recipe):
    import shutil

    run = ["--max_steps", 8, "--save_interval", 4, "--keep_last", 3, *recipe]
    assert run_in_process(capsys, *run, "--out_dir", "straight")[0] == 0
    straight = workdir / "straight/pretrain_dense"
    resumed = workdir / "resumed/pretrain_dense"
    resumed.mkdir(parents=True)
    shutil.copy(straight / "pretrain_64_resume_00000004.pt", resumed)
    assert run_in_process(capsys, *run, "--out_dir", "resumed", "--resume")[0] == 0
    a = torch.load(straight / "pretrain_64.pth", weights_only=True)
    b = torch.load(resumed / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("flags, words", [
    (["--eval_interval", "5", "--val_data", ""], "error: --eval_interval: it says how often to evaluate --val_data"),
    (["--eval_limit", "5"], "error: --eval_limit: it caps the examples of each --eval_tasks task"),
    (["--optimizer", "adamw", "--fsdp"], "error: --fsdp: it shards the model across the processes torchrun starts"),
    (["--optimizer", "adamw", "--muon_momentum", "0.9"], "error: --muon_momentum: it sets the momentum of Muon's"),
])
def test_a_flag_that_would_do_nothing_is_refused_in_one_line(workdir, capsys, flags, words):
    code, err = run_in_process(capsys, "--max_steps", 1, *flags)
    assert code == 2 and err[-1].startswith(words), err


def test_muon_under_fsdp_is_refused_in_one_line(workdir, capsys):
    code, err = run_in_process(capsys, "--optimizer", "muon", "--fsdp")
    assert code == 2 and err[-1].startswith("error: --optimizer muon with --fsdp: Muon orthogonalises whole matrices")
