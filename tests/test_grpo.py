"""6-grpo.py: advantages, the clipped loss against a hand computation, KL, rewards, learning, resume, errors."""

import csv
import math

import pytest
import torch

from dataset import DataError, PromptDataset
from dataset.rewards import contains, exact_match, numeric_match
from trainer.grpo import group_advantages, grpo_loss

from conftest import TINY, pretrain_file, run_stage, write_jsonl


def test_group_advantages_centre_and_scale_each_group_and_zero_an_equal_one():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    advantages = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # the unbiased std of 1, 0, 0, 1
    torch.testing.assert_close(advantages[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(advantages[1], torch.zeros(4))  # all equal: no gradient from this group
    torch.testing.assert_close(advantages[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (math.sqrt(2 / 3) + 1e-4))


def test_loss_equals_a_hand_computation_with_clipping_engaged():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0]])
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.2, -2.0, -1.0]])  # ratios e^0.5, 1, e^-1 / 1, e^-1, 1
    ref = torch.tensor([[-1.2, -0.4, -2.5], [-0.1, -2.5, -1.5]])
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the last token of row 0 is padding
    eps, beta, units = 0.2, 0.05, 5
    loss, kl, clipped = grpo_loss(logp, old, ref, advantages, mask, eps, beta, units)
    total, kl_total, clipped_count = 0.0, 0.0, 0
    for row in range(2):
        for t in range(3):
            if not mask[row, t]:
                continue
            ratio = math.exp(logp[row, t] - old[row, t])
            a = advantages[row].item()
            unclipped, bounded = ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a
            k3 = math.exp(ref[row, t] - logp[row, t]) - (ref[row, t] - logp[row, t]).item() - 1
            total += -min(unclipped, bounded) + beta * k3
            kl_total += k3
            clipped_count += unclipped > bounded
    assert clipped_count == 2  # row 0 token 0 (ratio above 1.2, A > 0) and row 1 token 1 (below 0.8, A < 0)
    assert loss.item() == pytest.approx(total / units, rel=1e-6)
    assert kl.item() == pytest.approx(kl_total, rel=1e-6) and clipped.item() == clipped_count


def test_log_probabilities_far_apart_outside_the_completion_leave_the_loss_finite():
    """Prompt and padding places are masked out, whatever their log-probabilities: exp of a gap of 1000 nats would
    be inf there, and inf × 0 a NaN that skips the step."""
    logp, mask = torch.zeros(1, 3), torch.tensor([[0, 1, 1]])
    old, ref = torch.tensor([[-1000.0, 0.0, 0.0]]), torch.tensor([[1000.0, 0.0, 0.0]])
    loss, kl, clipped = grpo_loss(logp, old, ref, torch.ones(1), mask, 0.2, 0.1, 2)
    assert (loss.item(), kl.item(), clipped.item()) == (-1.0, 0.0, 0)


@pytest.mark.parametrize("value, expected", [(True, 1.0), (False, 0.0), (torch.tensor(0.5), 0.5), (3, 3.0)])
def test_a_reward_function_may_return_any_number(tokenizer, value, expected):
    from trainer.grpo import GroupRelativePolicy

    policy = GroupRelativePolicy(None, tokenizer, agent_args(tools=None), "start")
    policy.custom_reward = lambda completion, answer: value
    assert policy.score("text", "answer", None, 0, "grpo.jsonl") == expected


def test_kl_is_zero_while_the_policy_is_the_reference():
    logp = torch.randn(3, 5)
    _, kl, _ = grpo_loss(logp, logp, logp, torch.ones(3), torch.ones(3, 5), 0.2, 0.1, 15)
    assert kl.item() == 0


@pytest.mark.parametrize("reward, completion, answer, expected", [
    (exact_match, "答案：“疑是地上霜”。", "疑是地上霜", 1.0),
    (exact_match, "The answer is: Paris!", "paris", 1.0),
    (exact_match, "Paris, France", "Paris", 0.0),
    # a number keeps its sign, decimal point and fraction bar; "answer" is a marker only as a word
    (exact_match, "答案：-5", "5", 0.0),
    (exact_match, "答案：-5", "-5", 1.0),
    (exact_match, "The answer is 3.14.", "314", 0.0),
    (exact_match, "The answer is 3.14.", "3.14", 1.0),
    (exact_match, "answer: 1/2", "12", 0.0),
    (exact_match, "Answering: 42", "ing42", 0.0),
    (numeric_match, "3 + 4 = 7", "7", 1.0),
    (numeric_match, "it is 1,250.0 in all", "1250", 1.0),
    (numeric_match, "the total is 1000", "1,000", 1.0),
    (numeric_match, "7 or maybe 8", "7", 0.0),
    (numeric_match, "x is 1,5", "15", 0.0),  # a comma not before three digits is no thousands' separator
    (numeric_match, "no number", "7", 0.0),
    (numeric_match, "答案是7", "7", 1.0),
    (numeric_match, "The answer is 3-5", "-5", 0.0),  # a hyphen between numbers is no minus
    (numeric_match, "348 - 719 = -371", "-371", 1.0),
    (contains, "下一句是“疑是地上霜”，出自李白的《静夜思》。", "疑是地上霜", 1.0),
    (contains, "下一句是“举头望明月”。", "疑是地上霜", 0.0),
    # a word or number only as a whole: not a digit of a longer number, not letters inside a word
    (contains, "answer: 15", "5", 0.0),
    (contains, "answer is -5", "5", 0.0),
    (contains, "it is 3.5", "5", 0.0),
    (contains, "it is 5, yes", "5", 1.0),
    (contains, "I do not know", "no", 0.0),
    (contains, "No, I think not.", "no", 1.0),
    (contains, "To be,or not to be: that is the question", "to be, or not to be", 1.0),
    (contains, "it is -5.", "-5", 1.0),  # a negative number stands apart from the word before it
    (contains, "the values are 3, -5", "-5", 1.0),
    (contains, "1,000 apples", "1000", 1.0),  # thousands' commas are no separators
    (contains, "it costs 1000 dollars", "1,000", 1.0),
    (contains, "it is 3/5", "3", 0.0),  # a number inside a fraction is not the number
    (contains, "it is 3/5", "5", 0.0),
])
def test_registry_rewards(reward, completion, answer, expected):
    assert reward(completion, answer) == expected


STARTS_WITH = '''
def starts_with(completion, answer):
    return float(completion.startswith(answer))
'''


def letter_task(directory):
    """An SFT model that answers A, B, C or D about equally often, and prompts that reward only A."""
    (directory / "data").mkdir()
    pretrain_file(directory / "data")
    question = [{"role": "user", "content": "Pick a letter."}]
    write_jsonl(directory / "data/sft.jsonl", [{"conversations": [*question, {"role": "assistant", "content": letter}]}
                                               for letter in "ABCD" * 8])
    write_jsonl(directory / "data/grpo.jsonl", [{"conversations": question, "answer": "A"}] * 64)
    (directory / "reward.py").write_text(STARTS_WITH)
    run_stage("2-sft.py", *TINY, "--max_steps", 30, "--learning_rate", 1e-2, cwd=directory)


def rewards(directory):
    with open(directory / "output/grpo_dense/grpo_64_log.csv") as f:
        return [float(row["reward"]) for row in csv.DictReader(f)]


GRPO = [*TINY, "--reward_fn", "reward.py:starts_with", "--num_generations", 8, "--max_new_tokens", 2,
        "--learning_rate", 5e-3, "--warmup_steps", 0, "--log_interval", 1]


def test_grpo_learns_a_checkable_reward_and_resumes_bit_exactly(tmp_path):
    letter_task(tmp_path)
    flags = [*GRPO, "--batch_size", 2, "--max_steps", 16, "--save_interval", 8]
    run_stage("6-grpo.py", *flags, cwd=tmp_path)
    curve = rewards(tmp_path)
    assert curve[0] < 0.3 and sum(curve[-3:]) / 3 > 0.8, curve
    straight = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)

    (tmp_path / "output/grpo_dense/grpo_64_resume_00000016.pt").unlink()  # back to step 8
    resumed = run_stage("6-grpo.py", *flags, "--resume", cwd=tmp_path)
    assert "resumed grpo_64_resume_00000008.pt" in resumed.stderr
    weights = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)
    for key in straight:  # the sampling generator is part of the resume state
        assert torch.equal(straight[key], weights[key]), key
    assert rewards(tmp_path) == curve


def test_grpo_reads_completions_with_the_tokenizer_its_run_trains_with(tmp_path):
    """A model fitted with its own tokenizer (saved beside its SFT weights): GRPO decodes and scores the completions
    with that one, not the project's."""
    from scripts import train_tokenizer

    (tmp_path / "data").mkdir()
    fruits = ["apple", "banana", "cherry", "damson"]
    question = [{"role": "user", "content": "Name a fruit."}]
    write_jsonl(tmp_path / "data/sft.jsonl", [{"conversations": [*question, {"role": "assistant", "content": fruit}]}
                                              for fruit in fruits * 8])
    write_jsonl(tmp_path / "data/grpo.jsonl", [{"conversations": question, "answer": "any"}] * 16)
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"Name a fruit. {fruit}"} for fruit in fruits * 30])
    train_tokenizer.fit(tmp_path / "corpus.jsonl", tmp_path / "fitted", vocab_size=300)
    letters = "".join(sorted(set("".join(fruits))))  # a completion spelled with them: the fruits read right
    (tmp_path / "reward.py").write_text(f"def a_fruit(completion, answer):\n    return float(bool(completion) and "
                                        f"set(completion) <= set({letters!r}))\n")
    run_stage("2-sft.py", *TINY, "--tokenizer_path", "fitted", "--max_steps", 30, "--learning_rate", 1e-2, cwd=tmp_path)
    run_stage("6-grpo.py", *TINY, "--reward_fn", "reward.py:a_fruit", "--num_generations", 8, "--max_new_tokens", 4,
              "--batch_size", 2, "--max_steps", 1, "--log_interval", 1, cwd=tmp_path)
    assert rewards(tmp_path)[0] > 0.5  # 0.06 when the completions were read with the project's tokenizer


def test_a_failing_reward_function_names_the_prompts_line(tmp_path):
    letter_task(tmp_path)
    (tmp_path / "reward.py").write_text("def starts_with(completion, answer):\n    return 'yes'\n")
    prompt = (tmp_path / "data/grpo.jsonl").read_text().splitlines()[0]
    (tmp_path / "data/grpo.jsonl").write_text(f"\n{prompt}\n")  # a blank line first: the prompt is on line 2
    result = run_stage("6-grpo.py", *GRPO, "--batch_size", 1, "--max_steps", 1, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data/grpo.jsonl, line 2: the reward function returned 'yes', not a finite number for this prompt's "
        "completion; fix the function or the line's \"answer\"")


def test_reused_rollouts_clip_and_resume_exactly_in_the_middle_of_their_reuse(tmp_path):
    letter_task(tmp_path)
    flags = [*GRPO, "--batch_size", 2, "--max_steps", 6, "--save_interval", 3, "--num_iterations", 2]
    run_stage("6-grpo.py", *flags, cwd=tmp_path)
    with open(tmp_path / "output/grpo_dense/grpo_64_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["reward"] for row in rows[0::2]] == [row["reward"] for row in rows[1::2]]  # each batch twice
    assert any(float(row["clipped"]) > 0 for row in rows[1::2])  # the second use is off-policy: clipping engages
    straight = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)
    (tmp_path / "output/grpo_dense/grpo_64_resume_00000006.pt").unlink()  # step 3: one reuse still pending
    run_stage("6-grpo.py", *flags, "--resume", cwd=tmp_path)
    weights = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)
    assert all(torch.equal(straight[key], weights[key]) for key in straight)


def test_a_numeric_prompt_whose_answer_is_no_number_is_refused_at_its_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "grpo.jsonl", [
        {"conversations": [{"role": "user", "content": "1 + 1?"}], "answer": "2", "reward": "numeric"},
        {"conversations": [{"role": "user", "content": "half?"}], "answer": "1/2", "reward": "numeric"}])
    with pytest.raises(DataError, match=f'{path}, line 2: "answer" "1/2" is not a number, which the numeric reward'):
        PromptDataset(path, tokenizer, 64)
    with pytest.raises(ValueError, match="'1/2' is not a number"):  # a line of the run's --reward: at its rollout
        numeric_match("no number here", "1/2")
    with pytest.raises(ValueError, match="'nan' is not a number"):  # which nothing would ever equal
        numeric_match("nan", "nan")


def test_a_prompt_of_only_a_system_turn_is_described_as_written(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "grpo.jsonl", [{"conversations": [{"role": "system", "content": "Be brief."}],
                                                  "answer": "1"}])
    with pytest.raises(DataError) as error:
        PromptDataset(path, tokenizer, max_length=48)
    message = str(error.value)
    assert message.startswith(f"{path}, line 1: the conversation holds only a system turn: after an optional system "
                              "turn: user, then the assistant;") and "ending with user or tool;" in message


@pytest.mark.parametrize("reward", [["exact"], {"name": "exact"}, 3, "exactly"])
def test_a_reward_that_names_no_registry_function_is_one_line(tmp_path, tokenizer, reward):
    path = write_jsonl(tmp_path / "grpo.jsonl", [{"conversations": [{"role": "user", "content": "1 + 1?"}],
                                                  "answer": "2", "reward": reward}])
    with pytest.raises(DataError, match=f"{path}, line 1: \"reward\" .* is none of exact, numeric, contains"):
        PromptDataset(path, tokenizer, max_length=48)


# ---- agentic rollouts: the model calls tools while it answers ---------------------------------------------


def agent_args(**overrides):
    from argparse import Namespace

    return Namespace(**{"fsdp": False, "num_generations": 2, "temperature": 1.0, "data_path": "grpo.jsonl",
                        "reward_fn": None, "reward": "numeric", "beta": 0.0, "max_new_tokens": 100, "top_p": 1.0,
                        "clip_eps": 0.2, "num_iterations": 1, "device": "cpu", "dtype": "float32", "seed": 0,
                        "tools": "calculator", "max_tool_calls": 2, "max_seq_len": 1024, **overrides})


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_the_policy_gradient_is_that_of_the_distribution_the_completions_were_sampled_from(tokenizer, temperature):
    """Sampled at temperature T, a completion's score is ∇ log softmax(z / T)[y]: the loss's gradient on the logits
    of a completion token is −A·(onehot(y) − softmax(z / T)) / T / units, and nothing on prompt or padding."""
    from dataset import collate
    from model import TinyMindForCausalLM
    from trainer.grpo import GroupRelativePolicy, Rollouts
    from trainer.objectives import Step

    from conftest import tiny_config

    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(initializer_range=0.5))
    policy = GroupRelativePolicy(None, tokenizer, agent_args(temperature=temperature, tools=None), "start")
    trained = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # a 3-token prompt, then the completion
    rows = [torch.randint(1, 64, (7,)), torch.randint(1, 64, (5,))]  # the second shorter: padded
    sequences = collate([(ids[:-1], ids[1:], trained[1:len(ids)]) for ids in rows], tokenizer.pad_token_id)
    advantages = torch.tensor([0.7, -0.7])
    rollouts = Rollouts(sequences, advantages, torch.tensor([1.0, 0.0]), 1, 0.0)
    policy.rollouts = [rollouts]
    logits = []

    def keep(module, inputs, out):
        out.logits.retain_grad()
        logits.append(out.logits)

    model.register_forward_hook(keep)
    units = int(sequences.loss_mask.sum())  # 4 + 2 completion tokens
    policy(model, rollouts, Step(units=units, micro_batches=1, processes=1)).loss.backward()
    [z] = logits
    expected = torch.softmax(z.detach() / temperature, dim=-1)
    expected.scatter_add_(-1, sequences.targets[..., None], -torch.ones_like(expected[..., :1]))
    expected *= (advantages / temperature / units)[:, None, None] * sequences.loss_mask[..., None]
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_a_temperature_that_decodes_greedily_is_refused(tokenizer, temperature):
    from trainer.errors import UserError
    from trainer.grpo import GroupRelativePolicy

    with pytest.raises(UserError, match=f"--temperature {temperature}: GRPO compares different completions"):
        GroupRelativePolicy(None, tokenizer, agent_args(temperature=temperature), "start")


def test_a_rollout_runs_the_call_and_trains_only_the_models_own_tokens(tool_caller, tokenizer):
    from conftest import QUESTION

    from dataset.prompts import PromptBatch
    from model import Sampling
    from trainer.grpo import GroupRelativePolicy

    _, model = tool_caller
    policy = GroupRelativePolicy(None, tokenizer, agent_args(), "start")
    chat = ([{"role": "user", "content": QUESTION}], None)
    [(ids, trained, text)] = policy.converse(model, None, chat, 1, Sampling())
    assert text == "17*23 = 391."
    learned = tokenizer.decode([t for t, m in zip(ids, trained) if m])
    assert learned == ('<think>\nUse the calculator.\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": '
                       '{"expression": "17*23"}}\n</tool_call><|im_end|>17*23 = 391.<|im_end|>')
    context = tokenizer.decode([t for t, m in zip(ids, trained) if not m])
    assert context.endswith("<|im_start|>user\n<tool_response>\n391\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert "# Tools" in context  # the run's tools are offered in the prompt
    prompt = torch.tensor(tokenizer("unused").input_ids)
    policy.sampling, _ = Sampling(temperature=0.3), policy.generator.manual_seed(0)
    rollouts = policy.roll_out(model, PromptBatch([prompt], ["391"], [None], [0], [chat]))
    assert rollouts.rewards.tolist() == [1.0, 1.0]  # both sampled conversations end in the right answer


def test_agentic_grpo_resumes_exactly_with_multi_turn_rollouts_pending(tool_caller, tmp_path):
    from conftest import MODEL, QUESTION

    path, _ = tool_caller
    write_jsonl(tmp_path / "data/grpo.jsonl", [{"conversations": [{"role": "user", "content": QUESTION}],
                                                "answer": "391", "reward": "numeric"}] * 8)
    flags = [*MODEL, "--max_seq_len", 1024, "--init_from", path, "--tools", "calculator", "--num_generations", 2,
             "--max_new_tokens", 120, "--batch_size", 1, "--max_steps", 4, "--save_interval", 1, "--keep_last", 4,
             "--num_iterations", 2, "--learning_rate", 1e-4, "--log_interval", 1, "--temperature", 0.3]
    run_stage("6-grpo.py", *flags, cwd=tmp_path)
    log = tmp_path / "output/grpo_dense/grpo_64_log.csv"
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert sum(float(row["reward"]) for row in rows) / len(rows) >= 0.75  # the taught conversation scores
    assert float(rows[0]["completion_len"]) > 60  # a call, and an answer after its result
    straight = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)
    for step in (4, 3, 2):  # back to step 1: its rollouts' second use still pending
        (tmp_path / f"output/grpo_dense/grpo_64_resume_{step:08d}.pt").unlink()
    run_stage("6-grpo.py", *flags, "--resume", cwd=tmp_path)
    weights = torch.load(tmp_path / "output/grpo_dense/grpo_64.pth", weights_only=True)
    assert all(torch.equal(straight[key], weights[key]) for key in straight)
