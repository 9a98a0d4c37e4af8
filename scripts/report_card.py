"""The report card of a pipeline run: what each stage did and how the model scores after it, as markdown.

    python -m scripts.report_card --out_dir output/demo          # make demo ends with this → output/demo/report.md

Every run folder under --out_dir (each stage's, found by its CSV log) gives a row: its tokens and training seconds,
its held-out figures before → after (the log's val_* columns), and the model it wrote scored on tinymind's
held-out tasks (tasks/*.yaml through lm-eval, at most --limit examples each): the multiple-choice tasks as plain
text for every model, the arithmetic tasks as chats for the models that chat (all but pretraining), the calculator
task without and then with the calculator. Each accuracy is centred on chance (0: chance, 1: all right); the
headline is their mean over the tasks a stage was scored on (the calculator task counted once, with the tool).
For the chat models, a repetition figure: the share of the 4-grams of the greedy answers to
scripts/demo_prompts.txt that repeat one earlier in the same answer; and the first answers.
"""

import argparse
import csv
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from lm_eval import simple_evaluate

from dataset.chat import render_chat
from model import Sampling, atomic_write
from trainer.benchmarks import TinyMindLM, centred_scores, task_manager
from trainer.loading import load_for_use
from trainer.tools import load_tools

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("pretrain", "sft", "lora", "dpo", "grpo", "distill")  # the pipeline's stages, in its order
CHOICE_TASKS = ("tinymind_idiom_meaning", "tinymind_next_line", "tinymind_char_reading")
CHAT_TASKS = ("tinymind_arithmetic",)
TOOL_TASKS = ("tinymind_calculator",)
TOOLED = " with the tool"  # a task scored with the calculator offered and run


def runs(out_dir):
    """(label, run folder, its weights) of every run under `out_dir`, in pipeline order; the repeats of
    `make demo-seeds` (under seed*/) are left to scripts.seed_spread."""
    found = []
    for log in Path(out_dir).rglob("*_log.csv"):
        if any(part.startswith("seed") for part in log.relative_to(out_dir).parts[:-2]):
            continue
        name = log.name.removesuffix("_log.csv")
        weights = next((log.with_name(name + suffix) for suffix in (".pth", ".safetensors")
                        if log.with_name(name + suffix).is_file()), None)
        if weights is not None:
            label = str(log.parent.relative_to(out_dir))
            found.append((label, log, weights))
    stage = lambda label: next((i for i, s in enumerate(ORDER) if Path(label).name.startswith(s)), len(ORDER))  # noqa: E731
    return sorted(found, key=lambda run: (stage(run[0]), run[0]))


def progress(log):
    """(tokens, seconds, {val column: (first, last)}) from a run's CSV log."""
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    held_out = {}
    for column in (rows[0].keys() if rows else ()):
        values = [float(row[column]) for row in rows if column.startswith("val_") and row[column]]
        if values:
            held_out[column[4:]] = (values[0], values[-1])
    last = rows[-1] if rows else {}
    return int(float(last.get("tokens") or 0)), float(last.get("seconds") or 0), held_out


def task_scores(model, tokenizer, tasks, chat, tools, limit, seed, suffix=""):
    """{task + suffix: (accuracy, centred)} on `tasks`, as chats or not, with `tools` offered and run or none."""
    args = SimpleNamespace(dtype="float32", device="cpu")
    results = simple_evaluate(model=TinyMindLM(model, tokenizer, 16, args, tools=tools), tasks=list(tasks),
                              limit=limit, task_manager=task_manager(), apply_chat_template=chat, log_samples=False,
                              verbosity="ERROR", random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    return {task + suffix: score for task, score in centred_scores(results).items()}


def scores(model, tokenizer, chats, limit, seed):
    """{task: (accuracy, centred)} on the tasks a model of its kind is scored on."""
    found = task_scores(model, tokenizer, CHOICE_TASKS, False, None, limit, seed)
    if chats:  # the calculator task twice: without the tool, then with it
        found |= task_scores(model, tokenizer, CHAT_TASKS + TOOL_TASKS, True, None, limit, seed)
        found |= task_scores(model, tokenizer, TOOL_TASKS, True, load_tools("calculator"), limit, seed, TOOLED)
    return found


@torch.no_grad()
def answers(model, tokenizer, prompts, new_tokens=80):
    """The greedy answer to each prompt, as a chat: its tokens."""
    lm = TinyMindLM(model, tokenizer)
    return [lm.reply(tokenizer(render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True),
                               add_special_tokens=False).input_ids, new_tokens, Sampling(), [])[0]
            for prompt in prompts]


def repeated_share(replies, n=4):
    """The share of the replies' token n-grams that repeat an earlier n-gram of the same reply."""
    repeated = total = 0
    for tokens in replies:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / max(total, 1)


def report(out_dir, limit, prompts_file, seed):
    prompts = [line.strip() for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows, samples, first = [], [], None
    for label, log, weights in runs(out_dir):
        started = time.perf_counter()
        model, tokenizer = load_for_use(weights)
        chats = not Path(label).name.startswith("pretrain")
        tokens, seconds, held_out = progress(log)
        task_scores = scores(model, tokenizer, chats, limit, seed)
        replies = answers(model, tokenizer, prompts) if chats else None
        first = first or model
        rows.append((label, tokens, seconds, held_out, task_scores, repeated_share(replies) if replies else None))
        if replies:
            samples.append((label, [(prompt, tokenizer.decode(reply, skip_special_tokens=True))
                                    for prompt, reply in zip(prompts[:3], replies[:3])]))
        print(f"{label}: scored in {time.perf_counter() - started:.0f} s", flush=True)
    if not rows:
        raise SystemExit(f"report_card: no run folder (a *_log.csv beside its weights) under {out_dir}")
    return markdown(out_dir, rows, samples, first, limit)


def markdown(out_dir, rows, samples, model, limit):
    config = model.config
    lines = [f"# Report card: {out_dir}", "",
             f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config.num_hidden_layers} "
             f"layers of width {config.hidden_size}, vocabulary {config.vocab_size:,}"
             f"{', MoE' if config.use_moe else ''}. Data (lines): "
             + (", ".join(f"{path.name} {sum(1 for _ in open(path, encoding='utf-8')):,}"
                          for path in sorted(Path("data").glob("*.jsonl"))) or "—") + ".", "",
             "## The stages", "", "| run | tokens | training s | held-out, before → after |", "|---|---:|---:|---|"]
    for label, tokens, seconds, held_out, _, _ in rows:
        figures = "; ".join(f"{name.replace('_', ' ')} {a:.4g} → {b:.4g}" for name, (a, b) in held_out.items())
        lines.append(f"| {label} | {tokens:,} | {seconds:.0f} | {figures or '—'} |")
    columns = (*CHOICE_TASKS, *CHAT_TASKS, *TOOL_TASKS, *(task + TOOLED for task in TOOL_TASKS))
    tasks = [task for task in columns if any(task in row[4] for row in rows)]
    lines += ["", f"## Held-out tasks (accuracy, at most {limit} examples each; headline: the mean accuracy centred "
                  "on chance)", "",
              "| run | " + " | ".join(task.removeprefix("tinymind_").replace("_", " ") for task in tasks)
              + " | headline | repeated 4-grams |",
              "|---|" + "---:|" * (len(tasks) + 2)]
    for label, _, _, _, task_scores, repetition in rows:
        cells = [f"{task_scores[task][0]:.3f}" if task in task_scores else "—" for task in tasks]
        # The headline counts each task once: the calculator task as the model answers it with its tool.
        counted = [centred for task, (_, centred) in task_scores.items()
                   if task.endswith(TOOLED) or task + TOOLED not in task_scores]
        headline = sum(counted) / max(len(counted), 1)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {headline:+.3f} | "
                     + (f"{repetition:.3f}" if repetition is not None else "—") + " |")
    lines += ["", "Chance: 0.25 for the four-choice tasks, 0 for arithmetic. The arithmetic tasks are asked as chats (the "
                  "calculator task without, then with the calculator offered and run; the headline counts the "
                  "latter); the pretrained model is not asked them.",
              "", "## Answers (greedy)", ""]
    for label, pairs in samples:
        lines.append(f"**{label}**")
        lines.append("")
        for prompt, reply in pairs:
            reply = " ".join(reply.split())
            lines.append(f"- {prompt} → {reply[:120]}{'…' if len(reply) > 120 else ''}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="output/demo", help="the pipeline's output folder")
    parser.add_argument("--limit", type=int, default=100, help="examples scored per task")
    parser.add_argument("--prompts_file", default=str(ROOT / "scripts/demo_prompts.txt"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    text = report(Path(args.out_dir), args.limit, args.prompts_file, args.seed)
    path = Path(args.out_dir) / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    print(text)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
