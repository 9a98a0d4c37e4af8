"""dataset/: the committed tokenizer, pretrain framing and shift, SFT loss mask and truncation, jsonl errors."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from dataset import (DEFAULT_TOKENIZER_PATH, DataError, PreferenceDataset, PretrainDataset, PromptDataset, SFTDataset,
                     load_tokenizer, text_or_chat_dataset,
                     truncate_turns)

from conftest import pretrain_file, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant. 回答要简短。"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "床前明月光的下一句是？"},
    {"role": "assistant", "content": "疑是地上霜。"},
]


@pytest.fixture(autouse=True)
def quiet_private_datasets_cache(tmp_path, monkeypatch):
    """Each test caches its Arrow files under its own tmp_path, without progress bars."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    yield
    if bars_were_on:
        datasets.enable_progress_bar()


def unpadded(item, length):
    """The first `length` token ids of the sequence an item was cut from."""
    input_ids, targets, _ = item
    return torch.cat([input_ids[:1], targets])[:length].tolist()


def trained_text(tokenizer, item):
    _, targets, loss_mask = item
    return tokenizer.decode(targets[loss_mask.bool()])


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


# ---- the committed tokenizer ----------------------------------------------------------------


def test_committed_tokenizer_round_trips_mixed_text_and_has_the_project_specials(tokenizer):
    assert Path(DEFAULT_TOKENIZER_PATH) == ROOT / "model" / "tokenizer"
    text = "Hello, 世界! 混合 English 与中文 text, 123 456.\n床前明月光，疑是地上霜。 😀\ttabs"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer) == 6400
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer("abc")["input_ids"] == tokenizer("abc", add_special_tokens=False)["input_ids"]
    # A chat without tools or thinking renders as plain ChatML.
    chatml = "".join(f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n" for turn in MULTI_TURN)
    assert tokenizer.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == chatml + "<|im_start|>assistant\n"


def test_load_tokenizer_names_missing_path_and_flag(tmp_path):
    with pytest.raises(DataError, match="--tokenizer_path") as error:
        load_tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


# ---- pretraining ----------------------------------------------------------------------------


def test_pretrain_frames_shifts_and_collates_with_an_attention_mask_from_the_lengths(tmp_path, tokenizer):
    # "<|endoftext|>" inside the text becomes the pad id: the masks must still count it as real.
    short, long = "a<|endoftext|>b 你好", "The quick brown fox jumps over the lazy dog. " * 10
    path = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": short}, {"text": long}])
    data = PretrainDataset(path, tokenizer, max_length=16)
    long_framed = [1, *tokenizer(long, add_special_tokens=False)["input_ids"], 2]
    windows = -(-(len(long_framed) - 1) // 15)
    assert len(data) == 1 + windows and data.skipped == 0 and data.bad_lines == 0
    assert data.notes() == [f"{path}: 1 documents longer than 16 tokens make {windows} samples of at most that"]

    framed = [1, *tokenizer(short, add_special_tokens=False)["input_ids"], 2]
    assert 0 in framed[1:-1]
    input_ids, targets, loss_mask = item = data[0]
    assert [tensor.shape for tensor in item] == [torch.Size([len(framed) - 1])] * 3  # exact length, no padding
    assert all(tensor.dtype == torch.long for tensor in item)
    assert unpadded(item, len(framed)) == framed
    assert torch.equal(targets[:-1], input_ids[1:])
    assert loss_mask.tolist() == [1] * (len(framed) - 1)

    # The long document in windows of 16 ids, each starting on the last of the one before: every token after its
    # first is a target exactly once, the eos included.
    parts = [data[1 + n] for n in range(windows)]
    assert unpadded(parts[0], 16) == long_framed[:16]
    assert torch.cat([targets for _, targets, _ in parts]).tolist() == long_framed[1:]
    assert all(mask.all() for _, _, mask in parts)
    assert list(data.lengths) == [len(framed)] + [16] * (windows - 1) + [len(long_framed) - 15 * (windows - 1)]

    batch = data.collate([data[0], data[1]])  # padded to the longest sample, not to max_length
    assert batch.input_ids.shape == (2, 15) and len(batch) == 2
    assert batch.attention_mask.tolist() == [[1] * (len(framed) - 1) + [0] * (16 - len(framed)), [1] * 15]
    assert batch.loss_mask[0].tolist() == batch.attention_mask[0].tolist()
    assert batch.input_ids[0, len(framed) - 1:].tolist() == [0] * (16 - len(framed))
    assert batch.tokens == len(framed) - 1 + 15


# ---- SFT: truncation and the loss mask ------------------------------------------------------


@pytest.mark.parametrize(
    "question, answer, limit, expected",
    [
        ("abcdefghij", "0123456789", 4, ("abcd", "0123")),
        ("你好世界你好世界", "", 4, ("你好世界", "")),
        ("short", "text", 100, ("short", "text")),
    ],
)
def test_truncate_turns_cuts_each_question_and_answer_to_the_limit(question, answer, limit, expected):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "reasoning_content": answer}]
    cut = truncate_turns(turns, limit)
    assert (cut[0]["content"], cut[1]["content"]) == expected and cut[1]["reasoning_content"] == expected[1]


def test_sft_keeps_an_english_answer_that_fits_whole_with_its_end(tmp_path, tokenizer):
    # 360 characters, about a hundred tokens: the chat fits in 256, though the answer is longer than 256 // 2
    # characters (an answer once cut there was trained to end mid-sentence).
    answer = "The quick brown fox jumps over the lazy dog, and then it rests in the sun. " * 5
    turns = [{"role": "user", "content": "Tell me about the fox."}, {"role": "assistant", "content": answer}]
    assert len(chat_ids(tokenizer, turns)) <= 256 and len(answer) > 256 // 2
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": turns}]), tokenizer, max_length=256)[0]
    assert trained_text(tokenizer, item) == answer + "<|im_end|>"


def test_truncate_turns_never_cuts_system_turns_tool_calls_or_tool_results():
    result = json.dumps({"rows": list(range(50))})
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"query": "x" * 80}}}
    turns = [{"role": "system", "content": "s" * 80}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": result}]
    assert truncate_turns(turns, 16) == turns


def test_sft_ids_follow_the_template_and_mask_only_answers_with_their_end_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURN}])
    item = SFTDataset(path, tokenizer, max_length=128)[0]
    expected_ids = chat_ids(tokenizer, MULTI_TURN)
    assert unpadded(item, len(expected_ids)) == expected_ids
    assert trained_text(tokenizer, item) == "Paris.<|im_end|>疑是地上霜。<|im_end|>"
    _, targets, loss_mask = item
    # Each trained run of targets starts right after an "assistant\n" header and ends on <|im_end|>.
    runs = torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), loss_mask, torch.tensor([0])]))).flatten().view(-1, 2)
    for start, end in runs.tolist():
        assert tokenizer.decode(targets[:start]).endswith("<|im_start|>assistant\n")
        assert targets[end - 1] == tokenizer.eos_token_id
    assert loss_mask[len(expected_ids) - 1:].sum() == 0


def test_sft_empty_answer_trains_only_its_end_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]}])
    assert trained_text(tokenizer, SFTDataset(path, tokenizer, max_length=64)[0]) == "<|im_end|>"


def test_sft_long_conversation_drops_oldest_pairs_and_keeps_the_last_answer(tmp_path, tokenizer):
    pairs = [(f"Question {n}: what comes next?", f"Answer {n} is right here.") for n in range(1, 6)]  # under 100 // 2 chars
    turns = [{"role": "system", "content": "Be brief."}]
    for question, answer in pairs:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    max_length = 100
    assert len(chat_ids(tokenizer, turns)) > max_length
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": turns}]), tokenizer, max_length)
    input_ids, _, _ = item = data[0]
    text = tokenizer.decode(input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Question 1:" not in text and "Answer 1 " not in text
    assert trained_text(tokenizer, item).endswith("Answer 5 is right here.<|im_end|>")
    with_recent_pairs = [chat_ids(tokenizer, [turns[0], *turns[1 + 2 * dropped:]]) for dropped in range(len(pairs))]
    longest_that_fits = next(ids for ids in with_recent_pairs if len(ids) <= max_length)
    assert longest_that_fits != with_recent_pairs[-1]  # more than the last pair survives
    assert unpadded(item, len(longest_that_fits)) == longest_that_fits


def test_sft_too_long_single_answer_is_cut_at_the_tail_not_the_start(tmp_path, tokenizer):
    answer = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 2
    turns = [{"role": "user", "content": "背一首诗。"}, {"role": "assistant", "content": answer}]
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": turns}]), tokenizer, max_length=24)[0]
    trained = trained_text(tokenizer, item).replace("\ufffd", "")  # the cut may split a character's bytes
    assert len(trained) > 3 and answer.startswith(trained)
    assert item[2][-1] == 1  # trained up to the cut


def test_sft_sample_with_no_trainable_token_is_skipped_and_counted(tmp_path, tokenizer):
    hopeless = [{"role": "system", "content": "A very long system prompt. " * 20}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    fine = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": hopeless}, {"conversations": fine}]), tokenizer, max_length=32)
    assert (len(data), data.skipped) == (1, 1)
    assert data.notes() == [f"{tmp_path / 'sft.jsonl'}: skipped 1 samples that kept no trainable token after "
                            "truncation to 32 tokens"]
    assert trained_text(tokenizer, data[0]) == "Hello<|im_end|>"


def test_sft_with_every_sample_untrainable_is_a_data_error(tmp_path, tokenizer):
    hopeless = [{"role": "system", "content": "A very long system prompt. " * 20}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match="no usable sample"):
        SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": hopeless}]), tokenizer, max_length=32)


# ---- bad jsonl: file, line number, what is wrong --------------------------------------------

GOOD_TEXT = b'{"text": "fine"}'
GOOD_CHAT = json.dumps({"conversations": MULTI_TURN[1:3]}).encode()


def chat_line(*turns):
    return json.dumps({"conversations": [{"role": role, "content": content} for role, content in turns]}).encode()


BAD_LINES = [
    # (dataset, bad line, words the message must hold); the bad line always lands on line 5
    (PretrainDataset, b'{"text": "unterminated}', "not valid JSON"),
    (PretrainDataset, b'{"txt": "typo"}', '"text"'),
    (PretrainDataset, b'{"text": 42}', "must be a string"),
    (PretrainDataset, b'{"text": "caf\xe9"}', "UTF-8"),
    (PretrainDataset, b'["text", "a list"]', "JSON object"),
    (PretrainDataset, b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not readable JSON"),
    (SFTDataset, b'{"conversations": [{"role": "user", "content": "Hi"}', "not valid JSON"),
    (SFTDataset, b'{"messages": []}', '"conversations"'),
    (SFTDataset, b'{"conversations": "Hi"}', "list of turns"),
    (SFTDataset, chat_line(("assistant", "Hi"), ("user", "Hello")), "role 'assistant'"),
    (SFTDataset, chat_line(("user", "Hi"), ("user", "Hi again"), ("assistant", "Hello")), "role 'user'"),
    (SFTDataset, chat_line(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")), "end with an assistant"),
    (SFTDataset, chat_line(("system", "Be kind."), ("user", "Hi"), ("system", "Again"), ("user", "x")), "role 'system'"),
    (SFTDataset, chat_line(("narrator", "Hi"), ("assistant", "Hello")), "role 'narrator'"),
    (SFTDataset, b'{"conversations": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}', 'string "content"'),
    (SFTDataset, b'{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}', 'string "content"'),
    (SFTDataset, b'{"conversations": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}', "surrogate"),
    (SFTDataset, b'{"conversations": [], "n": ' + b"9" * 5000 + b"}", "not readable JSON"),
]


@pytest.mark.parametrize("dataset_class, bad_line, words", BAD_LINES)
def test_bad_line_is_reported_with_file_and_exact_line_number(tmp_path, tokenizer, dataset_class, bad_line, words):
    good = GOOD_TEXT if dataset_class is PretrainDataset else GOOD_CHAT
    path = tmp_path / "my_data.jsonl"
    path.write_bytes(b"\n".join([good, b"", good, b"   ", bad_line, good, b""]))  # blank lines 2 and 4 still count
    with pytest.raises(DataError) as error:
        dataset_class(path, tokenizer, max_length=64)
    message = str(error.value)
    assert message.startswith(f"{path}, line 5: ") and words in message and "\n" not in message


def test_a_key_no_dataset_reads_may_change_type_across_the_file(tmp_path, tokenizer):
    # Arrow reads a file in blocks and gives up when a column's type changes between them, though no line is bad.
    path = tmp_path / "mixed.jsonl"
    with path.open("w") as f:
        for n in range(60_000):  # over 10 MB: the last line lands in a later block
            f.write(json.dumps({"text": f"line {n} " + "x" * 180, "meta": 1}) + "\n")
        f.write(json.dumps({"text": "the last line", "meta": "a string"}) + "\n")
    data = PretrainDataset(path, tokenizer, max_length=512)
    assert len(data) == 60_001


def test_a_first_line_that_is_not_utf8_is_named_by_the_dataset(tmp_path, tokenizer):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes('{"text": "你好"}\n'.encode("gbk"))
    with pytest.raises(DataError, match=f"{path}, line 1: invalid UTF-8"):
        text_or_chat_dataset(path, tokenizer, 64)


@pytest.mark.parametrize("dataset_class", [PretrainDataset, SFTDataset])
def test_file_missing_the_key_everywhere_is_blamed_on_its_first_line(tmp_path, tokenizer, dataset_class):
    path = tmp_path / "wrong_kind.jsonl"
    path.write_bytes(b'\n{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(DataError, match=f"{path}, line 2: no "):
        dataset_class(path, tokenizer, max_length=64)


@pytest.mark.parametrize("skip_bad_lines", [False, True])
@pytest.mark.parametrize("dataset_class", [PretrainDataset, SFTDataset, PreferenceDataset, PromptDataset])
@pytest.mark.parametrize("content, words", [(None, "does not exist"), (b"", "is empty"), (b"\n  \n\n", "is empty")])
def test_missing_or_empty_file_is_a_data_error(tmp_path, tokenizer, content, words, dataset_class, skip_bad_lines):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=words) as error:
        dataset_class(path, tokenizer, max_length=64, skip_bad_lines=skip_bad_lines)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("unreadable_line", [b"", b'{"conversations": [ oops'], ids=["arrow-readable", "arrow-unreadable"])
def test_skip_bad_lines_drops_and_counts_them(tmp_path, tokenizer, unreadable_line):
    lines = [GOOD_CHAT, unreadable_line, chat_line(("assistant", "Hi"), ("user", "Hello")), b'{"conversations": []}', GOOD_CHAT]
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = SFTDataset(path, tokenizer, max_length=64, skip_bad_lines=True)
    expected_bad = 3 if unreadable_line else 2
    assert (len(data), data.bad_lines, data.skipped) == (2, expected_bad, 0)
    assert data.notes() == [f"{path}: skipped {expected_bad} bad lines of {expected_bad + 2} (skip_bad_lines)"]
    assert trained_text(tokenizer, data[1]) == "Paris.<|im_end|>"


def test_rebuilding_a_dataset_reads_the_cache_and_gives_the_same_items(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURN}] * 3)
    first, second = SFTDataset(path, tokenizer, 64), SFTDataset(path, tokenizer, 64)
    assert first.samples.cache_files == second.samples.cache_files
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_a_change_to_the_encoding_code_is_not_served_rows_cached_before_it(tmp_path, tokenizer, monkeypatch):
    import dataset.tokenized

    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURN}] * 3)
    before = SFTDataset(path, tokenizer, 64).samples.cache_files
    monkeypatch.setattr(dataset.tokenized, "CODE_VERSION", "edited")  # the package's sources changed
    assert SFTDataset(path, tokenizer, 64).samples.cache_files != before


@pytest.mark.skipif(not (ROOT / "data" / "sft.jsonl").exists(), reason="data/sft.jsonl not prepared (scripts/prepare_data.py)")
def test_prepared_sft_data_trains_answers_only(tmp_path, tokenizer):
    with open(ROOT / "data" / "sft.jsonl", encoding="utf-8") as lines:
        head = tmp_path / "sft_head.jsonl"
        head.write_text("".join(next(lines) for _ in range(200)), encoding="utf-8")
    data = SFTDataset(head, tokenizer, max_length=256)
    assert len(data) + data.skipped == 200
    for item in data:
        trained = trained_text(tokenizer, item)
        assert "<|im_start|>" not in trained
        assert trained.endswith("<|im_end|>") or item[2][-1] == 1


@pytest.mark.parametrize("isolated", [True, False])
def test_packed_rows_hold_every_sample_once_with_its_own_targets(tokenizer, tmp_path, isolated):
    from dataset import Packed

    data = PretrainDataset(pretrain_file(tmp_path, copies=3), tokenizer, 40)
    packed = Packed(data, isolated=isolated)
    assert len(packed) < len(data) and all(length <= 39 for length in packed.lengths)
    rows = [packed[i] for i in range(len(packed))]
    assert torch.equal(torch.cat([row[1] for row in rows]), torch.cat([data[i][1] for i in range(len(data))]))
    fullest = max(range(len(packed)), key=lambda i: len(packed.packs[i]))
    ids, targets, mask, documents = rows[fullest]
    first = data[packed.packs[fullest][0]]
    assert torch.equal(ids[:len(first[0])], first[0]) and len(packed.packs[fullest]) > 1
    assert documents.max() == (len(packed.packs[fullest]) if isolated else 1)
    batch = packed.collate([rows[0], rows[fullest]])
    assert batch.attention_mask.max() == (len(packed.packs[fullest]) if isolated else 1)


def test_best_fit_rows_hold_each_sample_once_whole_and_fill_rows_fuller(tokenizer, tmp_path):
    from dataset import Packed
    from dataset.batch import best_fit_rows, next_fit_rows

    lengths = torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    for fit in (next_fit_rows, best_fit_rows):
        rows = fit(lengths, 63)
        assert sorted(i for row in rows for i in row) == list(range(500))
        assert all(sum(lengths[i] for i in row) <= 63 for row in rows)
    assert len(best_fit_rows(lengths, 63)) < 0.9 * len(next_fit_rows(lengths, 63))
    assert best_fit_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]  # 5 then 4 open rows; 3 fits the 4's (room 3) best

    data = PretrainDataset(pretrain_file(tmp_path, copies=3), tokenizer, 40)
    packed = Packed(data, isolated=True, best_fit=True)
    assert len(packed) <= len(Packed(data, isolated=True)) and all(length <= 39 for length in packed.lengths)
    for row, pack in enumerate(packed.packs):
        ids, targets, mask, documents = packed[row]
        for number, index in enumerate(pack, start=1):  # each sample whole, in its own document number
            assert torch.equal(ids[documents == number], data[index][0])
            assert torch.equal(targets[documents == number], data[index][1])


def test_worker_processes_report_a_bad_line_and_skip_bad_lines_as_one_process_does(tmp_path, tokenizer, monkeypatch):
    import dataset.tokenized

    lines = [json.dumps({"text": f"Passage number {i}."}).encode() for i in range(40)]
    lines[29] = b'{"txt": "typo"}'
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    alone = PretrainDataset(path, tokenizer, max_length=64, skip_bad_lines=True)
    monkeypatch.setattr(dataset.tokenized, "tokenizing_processes", lambda path: 2)  # as for a file over 128 MB
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "pooled_cache"))  # no cached result
    with pytest.raises(DataError) as error:
        PretrainDataset(path, tokenizer, max_length=64)
    assert str(error.value).startswith(f"{path}, line 30: ") and '"text"' in str(error.value)
    pooled = PretrainDataset(path, tokenizer, max_length=64, skip_bad_lines=True)
    assert (len(pooled), pooled.bad_lines) == (len(alone), alone.bad_lines) == (39, 1)
    assert all(torch.equal(a, b) for i in range(39) for a, b in zip(pooled[i], alone[i]))


def test_a_hub_repo_id_brings_its_own_tokenizer_and_an_unreachable_one_none(tmp_path, monkeypatch):
    import model.convert
    from dataset import load_tokenizer, tokenizer_beside

    load_tokenizer().save_pretrained(tmp_path / "snapshot")
    fetched = []

    def snapshot_download(repo, allow_patterns):
        fetched.append(repo)
        if repo != "owner/name":
            raise OSError("offline")
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(model.convert, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert tokenizer_beside("owner/name") == tmp_path / "snapshot"
    assert tokenizer_beside("owner/elsewhere") is None and fetched == ["owner/name", "owner/elsewhere"]
