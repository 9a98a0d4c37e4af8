"""Chats with tools and thinking: the data formats, the template, the loss mask, truncation and reading replies."""

import json

import pytest

from conftest import write_jsonl
from dataset import DataError, PreferenceDataset, PromptDataset, SFTDataset
from dataset.chat import ReplyReader, chat_messages, read_reply, render_chat


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                               "required": ["expression"]}}}
TOOL_CHAT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "What is 17*23?"},
    {"role": "assistant", "content": None, "reasoning_content": "Multiply with the tool.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\": \"17*23\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"result\": 391}"},
    {"role": "assistant", "content": "17*23 = 391."},
]
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'


def trained_text(tokenizer, item):
    _, targets, loss_mask = item
    return tokenizer.decode(targets[loss_mask.bool()])


def whole_text(tokenizer, item):
    input_ids, targets, _ = item
    return tokenizer.decode([int(input_ids[0]), *targets.tolist()])


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    """A tokenizer fitted by scripts.train_tokenizer to a small English corpus: what a user's own corpus gives."""
    from dataset import load_tokenizer
    from scripts import train_tokenizer

    directory = tmp_path_factory.mktemp("refitted")
    texts = ["To be, or not to be: that is the question. Whether 'tis nobler in the mind to suffer."] * 40
    write_jsonl(directory / "corpus.jsonl", [{"text": text} for text in texts])
    train_tokenizer.fit(directory / "corpus.jsonl", directory / "tokenizer", vocab_size=400)
    return load_tokenizer(directory / "tokenizer")


@pytest.mark.parametrize("which", ["shipped", "refitted"])
def test_the_mask_covers_thinking_calls_and_answers_never_the_tool_list_or_results(tmp_path, tokenizer, refitted,
                                                                                   which):
    tokenizer = tokenizer if which == "shipped" else refitted  # a refitted tokenizer keeps the template and tokens
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": TOOL_CHAT, "tools": [CALCULATOR]}]),
                      tokenizer, max_length=2048)[0]  # room for the 400-token tokenizer's longer ids
    assert trained_text(tokenizer, item) == (
        f"<think>\nMultiply with the tool.\n</think>\n\n{CALL_TEXT}<|im_end|>17*23 = 391.<|im_end|>")
    text = whole_text(tokenizer, item)
    assert '"description": "Evaluate arithmetic."' in text  # the tool list is in the prompt...
    assert "<tool_response>\n{\"result\": 391}\n</tool_response>" in text  # ...and so is the result, unlearned


def test_minimind3_layout_gives_the_same_ids_as_openai_messages(tmp_path, tokenizer):
    minimind3 = [
        {"role": "system", "content": "Use tools.", "functions": json.dumps([CALCULATOR["function"]])},
        TOOL_CHAT[1],
        {"role": "assistant", "content": f"<think>\nMultiply with the tool.\n</think>\n\n{CALL_TEXT}"},
        {"role": "tool", "content": "{\"result\": 391}"},
        TOOL_CHAT[4],
    ]
    openai = SFTDataset(write_jsonl(tmp_path / "a.jsonl", [{"conversations": TOOL_CHAT, "tools": [CALCULATOR]}]), tokenizer, 512)
    theirs = SFTDataset(write_jsonl(tmp_path / "b.jsonl", [{"conversations": minimind3}]), tokenizer, 512)
    assert [t.tolist() for t in openai[0]] == [t.tolist() for t in theirs[0]]


def test_lines_whose_arguments_differ_in_shape_load_as_written(tmp_path, tokenizer):
    # Arrow would merge these objects' keys into one struct (or refuse a string beside an object).
    calls = [{"expression": "1+1"}, "{\"expression\": \"2+2\", \"precision\": 3}", {"city": "北京"}]
    lines = [{"conversations": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": a}}]}]}
             for a in calls]
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", lines), tokenizer, 256)
    learned = [trained_text(tokenizer, data[i]) for i in range(3)]
    assert learned == ['<tool_call>\n{"name": "f", "arguments": {"expression": "1+1"}}\n</tool_call><|im_end|>',
                       '<tool_call>\n{"name": "f", "arguments": {"expression": "2+2", "precision": 3}}\n</tool_call><|im_end|>',
                       '<tool_call>\n{"name": "f", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>']


def test_a_long_tool_result_is_never_left_cut_in_the_prompt(tmp_path, tokenizer):
    result = json.dumps({"rows": [{"id": n, "name": f"item {n}"} for n in range(60)]})
    chat = [TOOL_CHAT[1], TOOL_CHAT[2], {"role": "tool", "content": result}, TOOL_CHAT[4]]
    messages, _ = chat_messages(chat)
    call_turn = len(tokenizer(render_chat(tokenizer, messages[:2]))["input_ids"])
    max_length = call_turn + 20  # the call fits; its result does not
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": chat}]), tokenizer, max_length)[0]
    text = whole_text(tokenizer, item)
    assert "<tool_response>" not in text and text.endswith("</tool_call><|im_end|>")  # ends on the last answer kept
    assert trained_text(tokenizer, item).endswith(f"{CALL_TEXT}<|im_end|>")


def test_thinking_off_opens_the_answer_with_an_empty_think_block(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(tokenizer, messages, add_generation_prompt=True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(tokenizer, messages, add_generation_prompt=True, thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_prompts_and_preference_pairs_carry_tools(tmp_path, tokenizer):
    prompt = PromptDataset(write_jsonl(tmp_path / "p.jsonl", [{"conversations": TOOL_CHAT[:4], "tools": [CALCULATOR],
                                                               "answer": "391"}]), tokenizer, 512)
    text = tokenizer.decode(prompt[0][0])
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n") and "# Tools" in text
    pair = {"chosen": TOOL_CHAT, "rejected": [*TOOL_CHAT[:4], {"role": "assistant", "content": "400"}], "tools": [CALCULATOR]}
    chosen, rejected = PreferenceDataset(write_jsonl(tmp_path / "d.jsonl", [pair]), tokenizer, 512)[0]
    assert (trained_text(tokenizer, chosen), trained_text(tokenizer, rejected)) == ("17*23 = 391.<|im_end|>", "400<|im_end|>")


BAD = [
    ([TOOL_CHAT[1], {"role": "tool", "content": "1"}, TOOL_CHAT[4]], "turn 2 has role 'tool' where 'assistant' belongs"),
    ([TOOL_CHAT[1], {"role": "assistant", "content": "x"}, {"role": "tool", "content": "1"}], "turn 3 has role 'tool' where 'user' belongs"),
    ([TOOL_CHAT[1], {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "turn 2, tool call 1: \"arguments\" is not valid JSON"),
    ([TOOL_CHAT[1], {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}], "turn 2, tool call 1: needs a function name"),
    ([{**TOOL_CHAT[1], "tool_calls": TOOL_CHAT[2]["tool_calls"]}, TOOL_CHAT[4]], "only assistant turns carry \"tool_calls\""),
    ([TOOL_CHAT[1], {"role": "assistant", "content": None}], 'turn 2 needs a string "content"'),
    ([TOOL_CHAT[1], {"role": "assistant", "content": "x", "reasoning_content": 3}], '"reasoning_content" must be a string'),
]


@pytest.mark.parametrize("turns, words", BAD)
def test_a_bad_chat_is_one_line_naming_file_line_and_turn(tmp_path, tokenizer, turns, words):
    good = {"conversations": [TOOL_CHAT[1], TOOL_CHAT[4]]}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, {"conversations": turns}])
    with pytest.raises(DataError) as error:
        SFTDataset(path, tokenizer, 128)
    assert str(error.value).startswith(f"{path}, line 2: ") and words in str(error.value) and "\n" not in str(error.value)


def test_a_bad_tool_list_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [TOOL_CHAT[1], TOOL_CHAT[4]], "tools": [{"type": "function"}]}])
    with pytest.raises(DataError, match="line 1: tool 1 needs a function name"):
        SFTDataset(path, tokenizer, 128)


# ---- reading a reply back ---------------------------------------------------------------------------------


def test_a_reply_splits_into_thinking_text_and_calls():
    reply = read_reply(f"<think>\nadd them\n</think>\n\nLet me use the tool.\n{CALL_TEXT}")
    assert (reply["reasoning_content"], reply["content"]) == ("add them", "Let me use the tool.")
    [call] = reply["tool_calls"]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "17*23"}'} and call["id"].startswith("call_")


@pytest.mark.parametrize("text", ["<tool_call>\nnot json\n</tool_call>", "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
                                  "Sure <tool_call>\n{\"name\": \"f\", \"arguments\": {"])
def test_a_malformed_call_comes_back_as_text(text):
    reply = read_reply(text)
    assert reply["tool_calls"] == [] and reply["content"] == text


def test_without_tools_a_call_is_plain_text():
    assert read_reply(CALL_TEXT, tools=False) == {"reasoning_content": None, "content": CALL_TEXT, "tool_calls": []}


def streamed(text):
    """The events a ReplyReader gives for `text` decoded one character at a time."""
    reader, events = ReplyReader(), []
    for end in range(1, len(text) + 1):
        events += reader.feed(text[:end])
    return events + reader.finish(text)


def test_streamed_pieces_add_up_to_the_whole_reply():
    text = f"<think>\nfirst, think\n</think>\n\nThe answer is {CALL_TEXT} then <tool_call>oops</tool_call> done.\n"
    events = streamed(text)
    whole = read_reply(text)
    assert "".join(v for k, v in events if k == "reasoning") == whole["reasoning_content"] == "first, think"
    assert "".join(v for k, v in events if k == "content") == whole["content"]
    assert [v["function"] for k, v in events if k == "tool_call"] == [c["function"] for c in whole["tool_calls"]]
    assert not any("<think" in v or "</think" in v for k, v in events if k != "tool_call")


@pytest.mark.parametrize("text, content", [
    ("Hello\n", "Hello\n"),  # the tail is the reply's own
    ("<think>\nhm\n</think>\n\nHello  \n", "Hello  \n"),
    (f"Let me check. \n{CALL_TEXT}\n", "Let me check."),  # the whitespace that framed a call is not
    # text on both sides of a MiniMind-style inline call stays apart
    (f"Let me check.\n{CALL_TEXT}\nI will wait.", "Let me check.\nI will wait."),
])
def test_a_reply_keeps_its_own_whitespace_and_texts_around_a_call_stay_apart(text, content):
    assert read_reply(text)["content"] == "".join(v for k, v in streamed(text) if k == "content") == content
    assert chat_messages([TOOL_CHAT[1], {"role": "assistant", "content": text}])[0][1]["content"] == content


def test_messages_keep_no_keys_the_template_does_not_read():
    messages, tools = chat_messages(TOOL_CHAT, [CALCULATOR])
    assert messages[2] == {"role": "assistant", "content": "", "reasoning_content": "Multiply with the tool.",
                           "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "17*23"}}}]}
    assert tools == [CALCULATOR]


def test_inline_calls_are_read_alike_by_the_check_and_the_renderer(tmp_path, tokenizer):
    from dataset.chat import chat_problem

    malformed = {"role": "assistant", "content": "<tool_call>oops</tool_call>"}
    assert chat_problem([TOOL_CHAT[1], malformed, {"role": "user", "content": "and?"}, TOOL_CHAT[4]]) is None
    assert "'tool' where 'user' belongs" in chat_problem([TOOL_CHAT[1], malformed, {"role": "tool", "content": "1"}])
    unclosed = {"role": "assistant", "content": f"<think>\nhmm {CALL_TEXT}"}  # still thinking: no call, all kept
    messages, _ = chat_messages([TOOL_CHAT[1], unclosed])
    assert messages[1] == {"role": "assistant", "content": unclosed["content"]}
    # After tool results the user may go on without an answer (a chat stopped mid-call), and the system turn's
    # MiniMind-3 "functions" are checked like "tools".
    assert chat_problem([*TOOL_CHAT[1:4], {"role": "user", "content": "never mind"}, TOOL_CHAT[4]]) is None
    assert chat_problem([{"role": "system", "content": "s", "functions": [1]}, *TOOL_CHAT[1:]]).startswith("tool 1 needs")


def test_thinking_on_opens_the_think_block_and_the_reply_is_read_inside_it(tokenizer):
    from dataset.chat import THINKING_PREFIX

    prompt = render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True, thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert read_reply("let me see\n</think>\n\nHello", prefix=THINKING_PREFIX) == {
        "reasoning_content": "let me see", "content": "Hello", "tool_calls": []}


def test_a_preference_pair_cut_to_the_turns_both_sides_share_is_skipped(tmp_path, tokenizer):
    messages, _ = chat_messages(TOOL_CHAT)
    shared = len(tokenizer(render_chat(tokenizer, messages[:3])).input_ids)  # through the tool result
    pairs = [{"chosen": TOOL_CHAT, "rejected": [*TOOL_CHAT[:4], {"role": "assistant", "content": "400"}]},
             {"chosen": [TOOL_CHAT[1], TOOL_CHAT[4]],
              "rejected": [TOOL_CHAT[1], {"role": "assistant", "content": "400"}]}]
    data = PreferenceDataset(write_jsonl(tmp_path / "d.jsonl", pairs), tokenizer, shared - 2)
    assert (len(data), data.skipped) == (1, 1)  # the tool pair lost both final answers: nothing to compare
