"""lm-eval on tinymind checkpoints: local YAML tasks (a multiple-choice one and a generative one) scored through
tinymind's own lm-eval model equal lm-eval's stock `hf` model on the Hugging Face export, example by example."""

import json
import textwrap

import pytest
import torch

from conftest import MODEL, run_stage, tiny_config, write_jsonl
from dataset import load_tokenizer
from model import TinyMindForCausalLM, save_weights
from model.convert import export_hf

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [("床前明月光，", ["疑是地上霜。", "处处闻啼鸟。", "花落知多少。", "低头思故乡。"], 0),
             ("The capital of France is", [" Paris.", " Rome.", " Berlin.", " Madrid."], 0),
             ("春眠不觉晓，", ["疑是地上霜。", "处处闻啼鸟。", "花落知多少。", "举头望明月。"], 1),
             ("1 + 1 =", [" 2", " 3", " 11", " 0"], 0),
             ("学而时习之，", ["不亦说乎？", "不亦乐乎？", "人不知而不愠。", "有朋自远方来。"], 0),
             ("To be, or not to be,", [" that is the question.", " the sun is out.", " a dog.", " 42."], 0)]


def write_tasks(directory):
    """A multiple-choice task and a generative one, in lm-eval's YAML, reading local jsonl."""
    mc = write_jsonl(directory / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    gen = write_jsonl(directory / "gen.jsonl", [{"question": q, "answer": c[a]} for q, c, a in QUESTIONS])
    (directory / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {mc}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    (directory / "tiny_gen.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {gen}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n", "。"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1)).eval()
    path = tmp_path_factory.mktemp("bench") / "tiny.pth"
    save_weights(model.state_dict(), model.config, path)
    return path, model


def per_example(results, task, metric):
    return [sample[metric] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_tinymind_scores_equal_lm_evals_hf_model_on_the_export_example_by_example(checkpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from trainer.benchmarks import TinyMindLM

    _, model = checkpoint
    tokenizer = load_tokenizer()
    manager = TaskManager(include_path=str(write_tasks(tmp_path)))
    ours = simple_evaluate(model=TinyMindLM(model, tokenizer, batch_size=5), tasks=["tiny_mc", "tiny_gen"],
                           task_manager=manager)
    export_hf(model, tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32"},
                             tasks=["tiny_mc", "tiny_gen"], task_manager=manager, device="cpu", batch_size=3)
    for task, metric in (("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_gen", "exact_match")):
        assert per_example(ours, task, metric) == per_example(theirs, task, metric), (task, metric)
    mine = [s["resps"] for s in sorted(ours["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    hf = [s["resps"] for s in sorted(theirs["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert mine == hf  # the same greedy continuations, not just the same score
    logprobs = [[float(r[0][0]) for r in s["resps"]] for s in sorted(ours["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    their_logprobs = [[float(r[0][0]) for r in s["resps"]] for s in sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(their_logprobs), atol=1e-4)


def test_choices_share_a_forward_and_rolling_likelihood_sums_every_token(checkpoint):
    from lm_eval.api.instance import Instance

    from trainer.benchmarks import TinyMindLM

    _, model = checkpoint
    tokenizer = load_tokenizer()
    calls = []
    hook = model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    try:
        lm = TinyMindLM(model, tokenizer, batch_size=8)
        requests = [Instance("loglikelihood", {}, (q, c), i) for i, (q, choices, _) in enumerate(QUESTIONS[:2])
                    for c in choices]
        scores = lm.loglikelihood(requests)
        assert len(calls) == 1 and calls[0][0] == 8  # two questions' four choices: one forward
        text = "床前明月光，疑是地上霜。"
        [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    finally:
        hook.remove()
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_token_id] + ids])).logits[0, :-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).sum()
    assert rolling == pytest.approx(float(expected), abs=1e-4)
    whole = tokenizer(QUESTIONS[0][0] + QUESTIONS[0][1][0]).input_ids
    context = len(tokenizer(QUESTIONS[0][0]).input_ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, context - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(whole[context:])[:, None]).sum()
    assert scores[0][0] == pytest.approx(float(expected), abs=1e-4)


def test_3_eval_tasks_prints_the_table_and_writes_the_json(checkpoint, tmp_path):
    path, _ = checkpoint
    write_tasks(tmp_path)
    shell = run_stage("3-eval.py", *MODEL, "--checkpoint", path, "--tasks", "tiny_mc,tiny_gen", "--include_path", tmp_path,
                      "--results", tmp_path / "scores.json", cwd=tmp_path)
    assert "tiny_mc" in shell.stdout and "acc_norm" in shell.stdout and "exact_match" in shell.stdout
    results = json.loads((tmp_path / "scores.json").read_text())
    assert set(results["results"]) == {"tiny_mc", "tiny_gen"}
    bad = run_stage("3-eval.py", *MODEL, "--checkpoint", path, "--tasks", "no_such_task", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --tasks: no task named no_such_task")


def test_own_tasks_come_from_held_out_sft_and_report_accuracy_centred_on_chance(checkpoint, tmp_path, monkeypatch):
    import scripts.data.tasks as own

    monkeypatch.setattr(own, "is_validation", lambda conversation: True)  # as if every line were held out
    chat = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    pool = {"dict": [chat(f"成语“{w}”是什么意思？", f"{w}（pīn yīn）：{m}\n出处：某书") for w, m in
                     [("画蛇添足", "比喻做了多余的事。"), ("守株待兔", "比喻死守经验。"), ("亡羊补牢", "比喻出了问题及时补救。"),
                      ("对牛弹琴", "比喻对不懂的人讲道理。"), ("井底之蛙", "比喻见识狭窄的人。")]]
                    + [chat(f"“{c}”这个字是什么意思？", f"“{c}”读作{p}，部首是口，共3画。\n释义") for c, p in
                       [("口", "kǒu"), ("日", "rì"), ("月", "yuè"), ("山", "shān")]],
            "poetry": [chat(f"“{a}”的下一句是什么？", f"下一句是“{b}”，出自某人的《某诗》。") for a, b in
                       [("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"), ("春眠不觉晓", "处处闻啼鸟"),
                        ("夜来风雨声", "花落知多少")]]}
    tasks = own.build_tasks(pool, [("3 + 4 = ?", 7), ("What is 9 - 2?", 7)], [("348 + 719 = ?", 1067)], seed=0)
    assert {name: len(lines) for name, lines in tasks.items()} == {
        "tinymind_idiom_meaning": 5, "tinymind_next_line": 4, "tinymind_char_reading": 4, "tinymind_arithmetic": 2,
        "tinymind_calculator": 1}
    first = tasks["tinymind_idiom_meaning"][0]
    assert first["question"] == "成语“画蛇添足”的意思是：" and first["choices"][first["answer"]] == "比喻做了多余的事。"
    assert len(set(first["choices"])) == 4
    assert tasks["tinymind_next_line"][0]["question"] == "“床前明月光”的下一句是："
    assert tasks["tinymind_char_reading"][0]["choices"][tasks["tinymind_char_reading"][0]["answer"]] == "kǒu"
    own.write_tasks(tasks, tmp_path / "data")
    path, _ = checkpoint
    shell = run_stage("3-eval.py", *MODEL, "--checkpoint", path, "--tasks", "tinymind", "--results",
                      tmp_path / "scores.json", cwd=tmp_path)
    results = json.loads((tmp_path / "scores.json").read_text())
    assert set(results["tinymind"]["centred"]) == set(tasks)
    for task, centred in results["tinymind"]["centred"].items():
        accuracy = next(v for k, v in results["results"][task].items() if k.split(",")[0] in ("acc", "exact_match"))
        chance = 0.25 if task in ("tinymind_idiom_meaning", "tinymind_next_line", "tinymind_char_reading") else 0.0
        assert centred == pytest.approx((accuracy - chance) / (1 - chance))
    assert f"headline (their mean): {results['tinymind']['headline']:+.3f}" in shell.stdout


def test_generation_with_tools_runs_the_calls_and_scores_the_final_answer(tool_caller, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from conftest import QUESTION
    from trainer.benchmarks import TinyMindLM
    from trainer.tools import load_tools

    _, model = tool_caller
    data = write_jsonl(tmp_path / "ask.jsonl", [{"question": QUESTION, "answer": "391"}])
    (tmp_path / "ask.yaml").write_text(textwrap.dedent(f"""\
        task: ask
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 120
        filter_list:
          - name: last_number
            filter:
              - function: regex
                regex_pattern: "(-?\\\\d+)(?!.*\\\\d)"
              - function: take_first
        metric_list:
          - metric: exact_match
        """))
    manager = TaskManager(include_path=str(tmp_path))
    scored = {}
    for tools in (load_tools("calculator"), None):
        results = simple_evaluate(model=TinyMindLM(model, load_tokenizer(), tools=tools), tasks=["ask"],
                                  task_manager=manager, apply_chat_template=True)
        [sample] = results["samples"]["ask"]
        scored[bool(tools)] = (results["results"]["ask"]["exact_match,last_number"], sample["resps"][0][0])
    assert scored[True] == (1.0, "17*23 = 391.")  # called the calculator, then answered from its result
    assert scored[False][0] == 0.0  # offered no tool, this model has nothing right to say


def test_task_names_resolve_with_tags_expanded_and_an_unknown_one_is_one_line():
    from trainer import UserError
    from trainer.benchmarks import resolve_tasks

    _, tasks = resolve_tasks("tinymind,tinymind_arithmetic")
    assert tasks == ["tinymind_arithmetic", "tinymind_calculator", "tinymind_char_reading", "tinymind_idiom_meaning",
                     "tinymind_next_line"]
    with pytest.raises(UserError, match="--eval_tasks: no task named nope"):
        resolve_tasks("nope", flag="--eval_tasks")


def test_task_accuracies_leave_the_runs_random_streams_as_they_were(tmp_path, monkeypatch):
    """--eval_tasks during training: lm-eval seeds the global generators, which must not restart the run's own
    (dropout's masks would repeat after every evaluation)."""
    import random
    from types import SimpleNamespace

    from trainer.benchmarks import task_accuracies

    monkeypatch.chdir(tmp_path)  # tinymind_arithmetic reads data/tasks/ here
    write_jsonl(tmp_path / "data/tasks/tinymind_arithmetic.jsonl", [{"question": "1 + 2 =", "answer": "3"}])
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400))
    args = SimpleNamespace(seed=0, eval_limit=1, batch_size=1, device="cpu", dtype="float32")

    def draws():
        return torch.rand(3).tolist(), random.random()

    torch.manual_seed(7), random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7)
    assert "tinymind_arithmetic" in task_accuracies(model, load_tokenizer(), ["tinymind_arithmetic"], args)
    assert draws() == expected

