"""torchrun on CPU with Gloo: 2 processes × batch b train what 1 process × batch 2b trains; resume across counts; FSDP."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from model import load_model

from conftest import (CONVERSATIONS, ROOT, TINY, copy_output, pretrain_file, run_stage, sft_file, shared_run,
                      write_jsonl)

MOE = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2"]
STEPS = ["--max_steps", 6, "--save_interval", 3, "--log_interval", 1]


def torchrun(*args, cwd, nproc=2, check=True, script="1-pretrain.py"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
         str(ROOT / script), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 or not check, f"torchrun failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def workdir(tmp_path):
    pretrain_file(tmp_path / "data", copies=6)  # 48 samples
    return tmp_path


def with_batch(batch_size):
    flags = list(TINY)
    flags[flags.index("--batch_size") + 1] = str(batch_size)
    return flags


# `--bigram_steps 0` says it: from a cold start the loss falls over the few steps (the warm start would fit these tiny
# texts' bigrams at once). The warm start itself is tested under DDP below.
WARM_START = ["--bigram_steps", "20", "--embedding_lr", "0.003", "--head_lr", "1e-3"]
ADAMW = ["--optimizer", "adamw", "--learning_rate", "5e-4", "--bigram_steps", "0"]


@pytest.fixture(scope="session")
def single_adamw(tmp_path_factory, worker_id):
    """The MoE run that DDP and FSDP (AdamW) must both equal: one process with their global batch."""
    return shared_run(tmp_path_factory, worker_id, "single_adamw", "1-pretrain.py", *with_batch(4), *MOE, *STEPS,
                      *ADAMW, "--out_dir", "single", copies=6)


@pytest.mark.parametrize("recipe", [ADAMW, [], WARM_START], ids=["adamw", "default", "warm_start"])
def test_two_processes_train_what_one_process_with_double_batch_trains(workdir, recipe, request):
    if recipe == ADAMW:
        single_dir = request.getfixturevalue("single_adamw") / "single/pretrain_moe"
    else:
        run_stage("1-pretrain.py", *with_batch(4), *MOE, *STEPS, *recipe, "--out_dir", "single", cwd=workdir)
        single_dir = workdir / "single/pretrain_moe"
    torchrun(*with_batch(2), *MOE, *STEPS, *recipe, "--out_dir", "ddp", cwd=workdir)
    single_log = log(single_dir / "pretrain_64_moe_log.csv")
    ddp_log = log(workdir / "ddp/pretrain_moe/pretrain_64_moe_log.csv")
    assert len(single_log) == len(ddp_log) == 6
    for one, two in zip(single_log, ddp_log):
        assert int(one["tokens"]) == int(two["tokens"])
        for column in ("loss", "ce", "aux", "grad_norm", "load_l0_e0", "load_l1_e3"):
            assert float(two[column]) == pytest.approx(float(one[column]), rel=1e-3, abs=1e-4), column
    single = torch.load(single_dir / "pretrain_64_moe.pth", weights_only=True)
    ddp = torch.load(workdir / "ddp/pretrain_moe/pretrain_64_moe.pth", weights_only=True)
    if recipe:
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], atol=1e-4, rtol=1e-3)
        return
    # The default (Muon, lr 2e-3) amplifies the rounding by which two processes' summed gradients differ from one
    # process's: Newton-Schulz spreads it over a whole matrix, and AdamW moves a weight whose gradient is ~0 by
    # ±lr whichever way it rounds. The losses agree as above; each weight tensor agrees to 1% of its norm (0.4% measured at most).
    for key in single:
        distance = (ddp[key] - single[key]).norm() / single[key].norm().clamp(min=1e-12)
        assert distance < 1e-2, (key, float(distance))


def test_two_process_checkpoint_resumes_in_one_process(workdir):
    torchrun(*with_batch(2), *STEPS[:1], 3, *STEPS[2:], "--out_dir", "out", cwd=workdir)
    result = run_stage("1-pretrain.py", *with_batch(2), *STEPS, "--out_dir", "out", "--resume", cwd=workdir,
                       check=False)
    # batch 2 in one process is another global batch than 2 × 2: the flag check must say so...
    assert result.returncode == 2 and "--batch_size" in result.stderr
    # ...while the same global batch (4 × 1 process) resumes and finishes the run.
    run_stage("1-pretrain.py", *with_batch(4), *STEPS, "--out_dir", "out", "--resume", cwd=workdir)
    rows = log(workdir / "out/pretrain_dense/pretrain_64_log.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, 7))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_trains_and_saves_a_loadable_full_checkpoint(workdir, dtype, request):
    # Two micro-batches a step: the first backward skips the gradients' reduce-scatter.
    result = torchrun(*with_batch(1), "--accumulation_steps", 2, *MOE, *STEPS, "--fsdp", "--dtype", dtype,
                      "--bigram_steps", 0, "--out_dir", "fsdp", cwd=workdir)
    assert "AdamW at lr 0.0005 instead of the default Muon" in result.stdout + result.stderr
    weights = workdir / "fsdp/pretrain_moe/pretrain_64_moe.pth"
    model = load_model(weights)
    assert model.model.layers[1].mlp.experts[3].down_proj.weight.shape == (64, 192)
    rows = log(weights.with_name("pretrain_64_moe_log.csv"))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    if dtype == "float32":  # the same steps as one process with the whole batch
        single = log(request.getfixturevalue("single_adamw") / "single/pretrain_moe/pretrain_64_moe_log.csv")
        for one, two in zip(single, rows, strict=True):
            assert float(two["loss"]) == pytest.approx(float(one["loss"]), rel=1e-3)
            assert float(two["grad_norm"]) == pytest.approx(float(one["grad_norm"]), rel=1e-3)


def test_an_error_on_the_main_process_stops_every_process_with_its_one_line(workdir, pretrained):
    copy_output(pretrained, workdir)
    result = torchrun(*with_batch(2), "--max_steps", 1, cwd=workdir, check=False)
    assert result.returncode != 0
    assert "error: output/pretrain_dense holds an earlier pretrain_64 run (up to step 1)" in result.stderr
    # The other process exits quietly with code 2, not with a broken-connection traceback of its own.
    assert "[rank1]" not in result.stderr and "exitcode: 2" in result.stderr


def test_outside_the_process_group_only_torchruns_first_process_speaks(monkeypatch, capsys):
    # An error every process raises before the group starts, or after it ends, is said once, not once a process.
    from trainer import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.say("error: from the second process", err=True)
    monkeypatch.setenv("RANK", "0")
    distributed.say("error: from the first process", err=True)
    assert capsys.readouterr().err == "error: from the first process\n"


@pytest.fixture
def sft_workdir(workdir, sft_trained):
    """An SFT checkpoint to start the post-training stages from, and their data."""
    sft_file(workdir / "data", copies=6)
    pairs = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "I would rather not say."}]}
             for c in CONVERSATIONS * 6]
    write_jsonl(workdir / "data/dpo.jsonl", pairs)
    prompts = [{"conversations": c[:-1], "answer": c[-1]["content"], "reward": "contains"} for c in CONVERSATIONS * 4]
    write_jsonl(workdir / "data/grpo.jsonl", prompts)
    copy_output(sft_trained, workdir)
    return workdir


@pytest.mark.parametrize("script, run, columns", [
    ("5-dpo.py", "dpo_dense/dpo_64", ("loss", "accuracy", "margin", "grad_norm")),
    ("4-lora.py", "lora_dense/lora_64", ("loss", "ce", "grad_norm")),
])
def test_post_training_stages_under_torchrun_train_what_one_process_with_double_batch_trains(sft_workdir, script,
                                                                                          run, columns):
    flags = ["--max_steps", 4, "--log_interval", 1, "--learning_rate", 1e-3]
    data = ["--data_path", "data/sft.jsonl"] if script == "4-lora.py" else []
    run_stage(script, *with_batch(4), *flags, *data, "--out_dir", "single", "--init_from",
              "output/sft_dense/sft_64.pth", cwd=sft_workdir)
    torchrun(*with_batch(2), *flags, *data, "--out_dir", "ddp", "--init_from", "output/sft_dense/sft_64.pth",
             cwd=sft_workdir, script=script)
    for one, two in zip(log(sft_workdir / f"single/{run}_log.csv"), log(sft_workdir / f"ddp/{run}_log.csv"),
                        strict=True):
        for column in columns:
            assert float(two[column]) == pytest.approx(float(one[column]), rel=1e-3, abs=1e-4), column
    if script == "4-lora.py":
        assert (sft_workdir / f"ddp/{run}/adapter_model.safetensors").is_file()


def test_grpo_under_torchrun_samples_on_every_process_and_trains(sft_workdir):
    torchrun(*with_batch(1), "--max_steps", 2, "--log_interval", 1, "--num_generations", 4, "--max_new_tokens", 4,
             "--out_dir", "ddp", "--init_from", "output/sft_dense/sft_64.pth", cwd=sft_workdir, script="6-grpo.py")
    rows = log(sft_workdir / "ddp/grpo_dense/grpo_64_log.csv")
    assert len(rows) == 2 and all(0 <= float(row["reward"]) <= 1 for row in rows)
    assert (sft_workdir / "ddp/grpo_dense/grpo_64.pth").is_file()
