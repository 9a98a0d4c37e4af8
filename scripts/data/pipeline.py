"""From parsed sources to jsonl: passages, deduplication, even sampling, system turns, the validation split, writing."""

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from tqdm import tqdm

from model import CheckpointError, atomic_write

from scripts.data import DataError

MAX_DOC_CHARS = 1500  # long works are cut into passages so one record is never a whole book
MIN_DOC_CHARS = 10
VAL_PER_MILLE = 20
SYSTEM_TURN_SHARE = 0.05


class Passage(str):
    """A pretraining text cut from a longer document (an article, a poem, a play), which decides its split."""

    def __new__(cls, text: str, document: str):
        passage = super().__new__(cls, text)
        passage.document = document
        return passage


# --------------------------------------------------------------------------- passages


def pack(pieces: list[str], max_chars: int = MAX_DOC_CHARS, sep: str = "\n") -> list[str]:
    """Greedily join consecutive pieces into chunks of at most max_chars (a longer piece stays whole)."""
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = current + sep + piece if current else piece
    return chunks + [current] if current else chunks


def pack_document(pieces: list[str], sep: str = "\n", prefix: str = "") -> list[str]:
    """pack() for the pieces of one document: each chunk (after `prefix`) is a Passage of that document."""
    document = sep.join(pieces)
    return [Passage(prefix + chunk, document) for chunk in pack(pieces, sep=sep)]


def split_passages(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut prose or verse into passages at blank lines; an overlong paragraph is cut at line ends."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if len(paragraph) > max_chars:
            pieces += pack(paragraph.splitlines(), max_chars, "\n")
        elif paragraph:
            pieces.append(paragraph)
    return pack(pieces, max_chars, "\n\n")


def cjk_share(text: str) -> float:
    """Share of CJK ideographs among the non-space characters: > 0.3 reads as Chinese."""
    chars = [c for c in text if not c.isspace()]
    return sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars) / max(len(chars), 1)


# --------------------------------------------------------------------------- the pipeline

SYSTEM_PROMPTS = {
    "zh": ["你是一个乐于助人的助手。", "你是一位知识渊博的中文老师，回答准确简洁。"],
    "en": ["You are a helpful assistant.", "You are a friendly chatbot. Keep answers short."],
}


def deduplicate(corpus: dict[str, list[str]]) -> dict[str, list[str]]:
    """Exact duplicates dropped across all sources (anthologies repeat famous poems), as are scraps."""
    seen = set()
    kept = {}
    for name, texts in corpus.items():
        kept[name] = [t for t in texts if len(t) >= MIN_DOC_CHARS and not (t in seen or seen.add(t))]
    return kept


def sample_evenly(corpus: dict[str, list], budget: float, size: Callable, seed: int) -> dict[str, list]:
    """About `budget` (summed with `size`) drawn at random, an equal share from each source.

    A source smaller than its share is taken whole and its unused share is split among
    the others, so a capped corpus still mixes every source it can.
    """
    totals = {name: sum(map(size, items)) for name, items in corpus.items()}
    shares, remaining = {}, budget
    by_size = sorted(corpus, key=totals.get)
    for i, name in enumerate(by_size):
        shares[name] = min(totals[name], remaining / (len(by_size) - i))
        remaining -= shares[name]
    sampled = {}
    for name, items in corpus.items():
        taken, used = [], 0
        for item in random.Random(f"{seed}:{name}").sample(items, len(items)):
            if used >= shares[name]:
                break
            taken.append(item)
            used += size(item)
        sampled[name] = taken
    return sampled


def add_system_turns(corpus: dict[str, list], seed: int) -> dict[str, list]:
    """A few conversations open with a system prompt, so the model has seen that role."""
    rng = random.Random(f"{seed}:system")
    result = {}
    for name, conversations in corpus.items():
        result[name] = []
        for conversation in conversations:
            if isinstance(conversation, dict):  # a line of its own ({"conversations", "tools"}): kept as it is
                result[name].append(conversation)
                continue
            if rng.random() < SYSTEM_TURN_SHARE and conversation[0]["role"] != "system":
                language = "zh" if cjk_share(conversation[0]["content"]) > 0.3 else "en"
                conversation = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[language])}] + conversation
            result[name].append(conversation)
    return result


def is_validation(record) -> bool:
    """Whether a record is held out: a stable hash of its document, so every passage of one article, poem,
    dictionary entry or play section lands on the same side; a conversation's ignores the added system turn."""
    if isinstance(record, Passage):
        key = record.document
    elif isinstance(record, str):
        key = record
    elif isinstance(record, dict):  # a preference pair or a GRPO prompt, held out by its prompt
        key = json.dumps(record["chosen"][:-1] if "chosen" in record else record["conversations"], ensure_ascii=False)
    else:
        key = json.dumps([turn for turn in record if turn["role"] != "system"], ensure_ascii=False)
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 1000 < VAL_PER_MILLE


def write_splits(corpus: dict[str, list], out_dir: Path, stem: str, field: str | None, seed: int) -> pd.DataFrame:
    """Writes <stem>.jsonl and <stem>_val.jsonl, shuffled across sources, each line {field: record} (the record
    itself when `field` is None); returns one row per record."""
    records = [(name, record) for name, items in corpus.items() for record in items]
    random.Random(f"{seed}:{stem}").shuffle(records)
    rows, splits = [], []
    for name, record in tqdm(records, desc=f"splitting {stem}"):
        split = "val" if is_validation(record) else "train"
        splits.append(split)
        if isinstance(record, dict):
            turns = [*record["chosen"], record["rejected"][-1]] if "chosen" in record else record["conversations"]
        else:
            turns = record
        chars = len(record) if isinstance(record, str) else sum(len(t["content"] or "") for t in turns)
        turns = 1 if isinstance(record, str) else len(turns)
        rows.append((name, split, chars, turns))

    def lines(wanted):
        for (_, record), split in zip(records, splits):
            if split == wanted:
                line = record if field is None or isinstance(record, dict) else {field: record}
                yield json.dumps(line, ensure_ascii=False) + "\n"
    write_lines(out_dir / f"{stem}.jsonl", lines("train"))
    write_lines(out_dir / f"{stem}_val.jsonl", lines("val"))
    return pd.DataFrame(rows, columns=["source", "split", "chars", "turns"])


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """The lines written to a temporary file renamed over `path`: an interrupted run leaves the previous file whole."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
    try:
        atomic_write(path, write)
    except CheckpointError as err:
        raise DataError(str(err)) from None


def summary(stats: pd.DataFrame) -> pd.DataFrame:
    def per_group(group: pd.DataFrame) -> pd.Series:
        chars = group["chars"]
        return pd.Series({"records": len(group), "val": (group["split"] == "val").sum(), "chars": chars.sum(),
                          "p10": chars.quantile(0.1), "p50": chars.median(), "p90": chars.quantile(0.9),
                          "max": chars.max(), "turns": group["turns"].mean()})
    table = pd.concat([stats.groupby("source").apply(per_group, include_groups=False),
                       per_group(stats).to_frame("all").T])
    return table.astype({c: "int64" for c in ["records", "val", "chars", "p10", "p50", "p90", "max"]}).round(2)


