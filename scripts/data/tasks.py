"""tinymind's own held-out tasks, in lm-eval's format: `tasks/*.yaml` score the files written here with
`3-eval.py --tasks tinymind` (the group) or one task by name.

Each task is built from SFT conversations that `prepare_data` holds out (the stable hash of `is_validation`), so SFT
never trains on its questions; the pretraining text may still hold the dictionary entry or the poem. Four choices
each, the distractors drawn from the same task's other answers:

    tinymind_idiom_meaning   成语“画蛇添足”的意思是： → its explanation among four
    tinymind_next_line       “床前明月光”的下一句是： → the next line among four of the same length
    tinymind_char_reading    “涠”字读作： → its pinyin among four
    tinymind_arithmetic      What is 7 + 5? → 12 (generative, the last number must be right: one-digit sums and
                             differences, asked as SFT asks them; only 200 such facts exist, and SFT and GRPO
                             train on them: this task alone is not held out)
    tinymind_calculator      计算：348 + 719 等于多少？ → 1067 (the same, three-digit sums and differences and two-digit
                             products: beyond the demo model without its calculator)
"""

import json
import random
import re
from pathlib import Path

from .pipeline import is_validation, write_lines

IDIOM = re.compile(r"^(?P<word>[^（\n]+)（[^）]*）：(?P<meaning>[^\n]+)")
NEXT_LINE = re.compile(r"^下一句是“(?P<next>[^”]+)”")
CHARACTER = re.compile(r"^“(?P<char>.)”读作(?P<pinyin>[^，。\n]+)")
LINE_IN_QUESTION = re.compile(r"“(?P<line>[^”]+)”的下一句|^(?P<plain>[^，：]+)，下一句|请接下一句：(?P<asked>.+)$")
CHOICES = 4


def held_out(conversations):
    """(question, answer) of each held-out single-exchange conversation."""
    for conversation in conversations:
        turns = [turn for turn in conversation if turn["role"] != "system"] if isinstance(conversation, list) else []
        if len(turns) == 2 and is_validation(conversation):
            yield turns[0]["content"], turns[1]["content"]


def multiple_choice(items, rng, same_kind=lambda a, b: True):
    """[{"question", "choices", "answer"}]: each item's answer among three others' (of the same kind)."""
    answers = sorted({answer for _, answer in items})
    tasks = []
    for question, answer in items:
        others = [other for other in answers if other != answer and same_kind(other, answer)]
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        tasks.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    return tasks


def build_tasks(sft: dict[str, list], arithmetic: list, calculator: list, seed: int) -> dict[str, list]:
    """{task name: its lines} from the SFT pools (source → conversations) and generated arithmetic problems
    ([(question, answer)], from seeds SFT and GRPO do not use)."""
    rng = random.Random(f"{seed}:tasks")
    idioms, lines, characters = [], [], []
    for conversations in sft.values():
        for question, answer in held_out(conversations):
            if (match := NEXT_LINE.match(answer)) and (asked := LINE_IN_QUESTION.search(question)):
                line = asked.group("line") or asked.group("plain") or asked.group("asked")
                lines.append((f"“{line.strip()}”的下一句是：", match.group("next")))
            elif match := CHARACTER.match(answer):
                characters.append((f"“{match.group('char')}”字读作：", match.group("pinyin").strip()))
            elif match := IDIOM.match(answer):
                idioms.append((f"成语“{match.group('word')}”的意思是：", match.group("meaning").strip()))
    return {
        "tinymind_idiom_meaning": multiple_choice(idioms, rng),
        "tinymind_next_line": multiple_choice(lines, rng, lambda a, b: len(a) == len(b)),
        "tinymind_char_reading": multiple_choice(characters, rng),
        "tinymind_arithmetic": [{"question": question, "answer": str(answer)} for question, answer in arithmetic],
        "tinymind_calculator": [{"question": question, "answer": str(answer)} for question, answer in calculator],
    }


def write_tasks(tasks: dict[str, list], out_dir: Path) -> dict[str, int]:
    """data/tasks/<name>.jsonl for each task; {name: lines}."""
    directory = Path(out_dir) / "tasks"
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in tasks.items():
        write_lines(directory / f"{name}.jsonl", [json.dumps(line, ensure_ascii=False) + "\n" for line in lines])
    return {name: len(lines) for name, lines in tasks.items()}
