"""5-dpo.py: the DPO loss against a hand computation, its gradient, learning, accumulation, resume, bad lines."""

import copy
import csv
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from dataset import DataError, PreferenceDataset
from model import TinyMindForCausalLM
from trainer import DirectPreference, Step

from conftest import MODEL, TINY, copy_output, run_stage, sft_file, shared_run, tiny_config, write_jsonl

QUESTION = [{"role": "user", "content": "Say something."}]


def pair(chosen, rejected, prompt=QUESTION):
    return {"chosen": [*prompt, {"role": "assistant", "content": chosen}],
            "rejected": [*prompt, {"role": "assistant", "content": rejected}]}


PAIRS = [  # uneven answer lengths, so every batch has padding
    pair("Yes.", "No, not at all, never."),
    pair("A much longer chosen answer than the other one.", "Short."),
    pair("中文回答。", "English answer"),
]


@pytest.fixture
def preferences(tmp_path, tokenizer):
    return PreferenceDataset(write_jsonl(tmp_path / "dpo.jsonl", PAIRS), tokenizer, max_length=48)


def models(seed=0):
    torch.manual_seed(seed)
    reference = TinyMindForCausalLM(tiny_config(vocab_size=6400)).eval()
    policy = copy.deepcopy(reference)
    return policy, reference


def hand_loss(policy, reference, dataset, beta):
    """Each answer alone, unpadded: Σ log-softmax of its trained tokens, then −log σ(β·margin) averaged."""
    def logp(model, sample):
        input_ids, targets, mask = sample
        logits = model(input_ids[None]).logits[0]
        return (logits.log_softmax(-1).gather(1, targets[:, None])[:, 0] * mask).sum()

    losses = []
    for chosen, rejected in (dataset[i] for i in range(len(dataset))):
        margin = (logp(policy, chosen) - logp(reference, chosen)) - (logp(policy, rejected) - logp(reference, rejected))
        losses.append(-F.logsigmoid(beta * margin))
    return torch.stack(losses).mean()


def test_loss_is_ln2_while_the_policy_is_the_reference(preferences):
    policy, reference = models()
    batch = preferences.collate([preferences[i] for i in range(len(preferences))])
    result = DirectPreference(reference, 0.1, None)(policy.train(), batch, Step(len(preferences), 1, 1))
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert result.metrics["accuracy"].item() == 0.5 and result.metrics["margin"].item() == 0


def test_loss_equals_a_hand_computation_with_padding_and_uneven_answers(preferences):
    policy, reference = models()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = preferences.collate([preferences[i] for i in range(len(preferences))])
    assert (batch.both.attention_mask == 0).any()
    result = DirectPreference(reference, 0.3, None)(policy.train(), batch, Step(len(preferences), 1, 1))
    with torch.no_grad():
        expected = hand_loss(policy.eval(), reference, preferences, beta=0.3)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_gradient_step_raises_the_chosen_answer_against_the_rejected(preferences):
    policy, reference = models()
    objective = DirectPreference(reference, 0.1, None)
    batch = preferences.collate([preferences[i] for i in range(len(preferences))])
    objective(policy.train(), batch, Step(len(preferences), 1, 1)).loss.backward()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.sub_(0.5 * parameter.grad)
        chosen, rejected, _, _ = objective.rewards(policy.eval(), batch)
    assert (chosen - rejected > 0).all()


def test_accumulated_pairs_equal_one_large_batch(preferences):
    objective_whole, objective_split = (DirectPreference(models()[1], 0.1, None) for _ in range(2))
    policy = models()[0].train()
    perturbed = {name: p + 0.05 * torch.randn_like(p) for name, p in policy.state_dict().items()}
    policy.load_state_dict(perturbed)
    samples = [preferences[i] for i in range(3)]

    def gradient(objective, micro_batches):
        policy.zero_grad()
        loss = sum(objective(policy, preferences.collate(part), Step(3, len(micro_batches), 1)).loss
                   for part in micro_batches)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])

    whole = gradient(objective_whole, [samples])
    split = gradient(objective_split, [samples[:1], samples[1:]])
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    torch.testing.assert_close(split[1], whole[1], atol=1e-7, rtol=1e-5)


def rule_pairs(count, seed):
    """Chosen answers are Chinese characters, rejected ones Latin letters: a rule a tiny model can learn."""
    rng = random.Random(seed)
    han = [chr(code) for code in range(0x4E00, 0x4E00 + 400)]
    pairs = []
    for _ in range(count):
        prompt = [{"role": "user", "content": " ".join(rng.choice("abcdefg") for _ in range(3))}]
        chosen = "".join(rng.choice(han) for _ in range(rng.randint(2, 5)))
        rejected = "".join(rng.choice("hijklmnop") for _ in range(rng.randint(2, 5)))
        pairs.append(pair(chosen, rejected, prompt))
    return pairs


def test_dpo_learns_a_held_out_preference_and_resumes_bit_exactly(tmp_path, sft_trained):
    write_jsonl(tmp_path / "data/dpo.jsonl", rule_pairs(256, seed=0))
    write_jsonl(tmp_path / "data/dpo_val.jsonl", rule_pairs(64, seed=1))
    copy_output(sft_trained, tmp_path)
    flags = [*TINY, "--batch_size", 8, "--max_steps", 40, "--learning_rate", 3e-3, "--warmup_steps", 0,
             "--save_interval", 20, "--accumulation_steps", 2]
    result = run_stage("5-dpo.py", *flags, cwd=tmp_path)
    before = float(re.search(r"held-out reward accuracy before dpo: ([\d.]+)", result.stdout).group(1))
    after = float(re.search(r"held-out reward accuracy after dpo: ([\d.]+)", result.stdout).group(1))
    assert before == 0.5 and after >= 0.75, result.stdout
    assert re.search(r"held-out chosen-answer perplexity after dpo: [\d.]+", result.stdout)
    straight = torch.load(tmp_path / "output/dpo_dense/dpo_64.pth", weights_only=True)

    (tmp_path / "output/dpo_dense/dpo_64_resume_00000040.pt").unlink()  # back to step 20
    resumed = run_stage("5-dpo.py", *flags, "--resume", cwd=tmp_path)
    assert "resumed dpo_64_resume_00000020.pt" in resumed.stderr
    weights = torch.load(tmp_path / "output/dpo_dense/dpo_64.pth", weights_only=True)
    for key in straight:
        assert torch.equal(straight[key], weights[key]), key


def test_a_long_pair_drops_the_same_older_exchanges_from_both_sides(tmp_path, tokenizer):
    earlier = []
    for n in range(1, 4):
        earlier += [{"role": "user", "content": f"Question {n}: what comes next?"},
                    {"role": "assistant", "content": f"Answer {n} is right here."}]
    question = {"role": "user", "content": "And the last one?"}
    pair = {"chosen": [*earlier, question, {"role": "assistant", "content": "A long and careful answer " * 2}],
            "rejected": [*earlier, question, {"role": "assistant", "content": "No."}]}
    data = PreferenceDataset(write_jsonl(tmp_path / "dpo.jsonl", [pair]), tokenizer, max_length=100)
    (chosen, _, chosen_mask), (rejected, _, rejected_mask) = data[0]
    prompts = [tokenizer.decode(ids[:int(mask.nonzero()[0])]) for ids, mask in ((chosen, chosen_mask),
                                                                                   (rejected, rejected_mask))]
    assert "Question 2:" not in prompts[0] and prompts[0] == prompts[1]  # one prompt, cut alike on both sides


def test_dpo_needs_an_sft_checkpoint(tmp_path):
    write_jsonl(tmp_path / "data/dpo.jsonl", PAIRS)
    result = run_stage("5-dpo.py", *MODEL, "--max_steps", 1, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no output/sft_dense/sft_64.pth: dpo starts")


@pytest.mark.parametrize("line, words", [
    ({"chosen": PAIRS[0]["chosen"]}, 'no "rejected" key'),
    ({**PAIRS[0], "rejected": [{"role": "user", "content": "Something else."}, PAIRS[0]["rejected"][1]]},
     "must share every turn but the last"),
    ({**PAIRS[0], "rejected": QUESTION}, "must end with an assistant answer"),
    ({**PAIRS[0], "chosen": "Yes."}, '"chosen" must be a non-empty list'),
])
def test_bad_preference_lines_name_file_line_and_fix(tmp_path, tokenizer, line, words):
    path = write_jsonl(tmp_path / "dpo.jsonl", [PAIRS[1], line])
    with pytest.raises(DataError, match=re.escape(words)) as error:
        PreferenceDataset(path, tokenizer, max_length=48)
    assert str(error.value).startswith(f"{path}, line 2: ") and "fix or delete that line" in str(error.value)


def test_on_policy_pairs_reject_the_models_own_finished_answers(tmp_path, tool_caller):
    """The model's greedy answer is the rejected one where it differs from the reference; one equal to it, or cut off
    at --max_new_tokens (as a whole answer it would end where the model did not), makes no pair."""
    from conftest import GREETING, QUESTION
    from trainer.tools import load_tools

    greeting = GREETING[0]
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [greeting, {"role": "assistant", "content": "Hi there."}]},  # it says "Hello!"
        {"conversations": GREETING},  # it says what the reference says
        # offered the calculator (the line's tools reach the prompt), it thinks, then calls it: past 8 tokens
        {"conversations": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "391"}],
         "tools": load_tools("calculator").schemas},
    ])
    result = run_stage("-m", "scripts.sample_pairs", "--checkpoint", tool_caller[0], "--data", data, "--temperature", 0,
                       "--max_new_tokens", 8, "--out", "pairs.jsonl", cwd=tmp_path)
    assert ("wrote 1 pairs to pairs.jsonl (1 answers equal to the reference and 1 cut off at --max_new_tokens 8 were "
            "left out)") in result.stdout
    [pair] = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pair == {"chosen": [greeting, {"role": "assistant", "content": "Hi there."}],
                    "rejected": [greeting, {"role": "assistant", "content": "Hello!"}]}


MOE = ["--model_type", "moe", "--n_routed_experts", 4, "--num_experts_per_tok", 2, "--n_shared_experts", 0]


@pytest.fixture(scope="module")
def moe_sft(tmp_path_factory, worker_id):
    return shared_run(tmp_path_factory, worker_id, "moe_sft", "2-sft.py", *TINY, *MOE, "--max_steps", 2)


@pytest.mark.parametrize("start", ["bare", "flagged"])
def test_the_reference_is_the_policy_as_the_flags_load_it(tmp_path, start, moe_sft):
    """A bare .pth (its shape from the flags) and a flag override (--norm_topk_prob false) reach the reference
    as they reach the policy: the two are one model at the start, so the first step's rewards are exactly 0."""
    write_jsonl(tmp_path / "data/dpo.jsonl", rule_pairs(8, seed=0))
    write_jsonl(tmp_path / "data/dpo_val.jsonl", rule_pairs(16, seed=1))
    copy_output(moe_sft, tmp_path)
    sft = tmp_path / "output/sft_moe/sft_64_moe.pth"
    if start == "bare":
        (tmp_path / "bare.pth").write_bytes(sft.read_bytes())  # no .json beside it
        flags = ["--init_from", "bare.pth"]
    else:
        flags = ["--norm_topk_prob", "false"]
    run_stage("5-dpo.py", *TINY, *MOE, *flags, "--max_steps", 1, cwd=tmp_path)
    with open(tmp_path / "output/dpo_moe/dpo_64_moe_log.csv") as f:
        first = next(row for row in csv.DictReader(f) if row["step"] == "1")
    assert float(first["chosen_reward"]) == float(first["rejected_reward"]) == 0.0, first
