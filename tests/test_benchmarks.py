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
