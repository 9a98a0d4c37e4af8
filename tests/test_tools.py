"""Tool calling end to end: a tiny model taught one tool-using chat calls the calculator from 3-eval's loop and
through the server (OpenAI's client, streaming and not), with its thinking as reasoning_content."""

import json
from argparse import Namespace

import pytest

from conftest import GREETING, MODEL, QUESTION, Server, run_stage
from dataset import DataError, load_tokenizer
from trainer.chat import converse
from trainer.tools import calculator, load_tools

def chat_args(**overrides):
    return Namespace(**{"max_tool_calls": 4, "think": None, "max_seq_len": 2048, "max_new_tokens": 200, "temperature": 0,
                        "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "compile_decode": False, "device": "cpu",
                        "dtype": "float32", **overrides})


def test_the_chat_loop_runs_the_call_and_the_model_answers_from_its_result(tool_caller, tokenizer, capsys):
    _, model = tool_caller
    turns = converse(model, tokenizer, [{"role": "user", "content": QUESTION}], chat_args(), load_tools("calculator"))
    call, result, answer = turns
    assert call["reasoning_content"] == "Use the calculator." and call["content"] == ""
    assert [c["function"] for c in call["tool_calls"]] == [{"name": "calculator", "arguments": '{"expression": "17*23"}'}]
    assert (result["role"], result["content"], result["tool_call_id"]) == ("tool", "391", call["tool_calls"][0]["id"])
    assert answer == {"role": "assistant", "content": "17*23 = 391."}
    shown = capsys.readouterr().out
    assert shown == 'Use the calculator.\n→ calculator({"expression": "17*23"})\n← 391\n17*23 = 391.\n'


def test_3_eval_with_tools_shows_the_call_its_result_and_the_answer(tool_caller, tmp_path):
    path, _ = tool_caller
    shell = run_stage("3-eval.py", *MODEL, "--checkpoint", path, "--tools", "calculator", "--prompt", QUESTION,
                      "--temperature", 0, "--max_new_tokens", 200, "--max_seq_len", 1024, cwd=tmp_path)
    assert shell.stdout == (f"> {QUESTION}\nUse the calculator.\n→ calculator({{\"expression\": \"17*23\"}})\n"
                            "← 391\n17*23 = 391.\n")


def test_a_tools_file_offers_its_public_functions_with_schemas_from_their_docstrings(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text('import math\n\n\ndef weather(city: str, days: int = 1) -> str:\n    """Forecast for a city.\n\n'
                    '    Args:\n        city: the city\n        days: how many days\n    """\n    return f"sunny in {city}"\n\n\n'
                    'def _helper():\n    pass\n')
    tools = load_tools(f"calculator,{path}")
    assert [schema["function"]["name"] for schema in tools.schemas] == ["calculator", "weather"]
    assert tools.schemas[1]["function"]["parameters"] == {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string", "description": "the city"}, "days": {"type": "integer", "description": "how many days"}}}
    call = {"function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    assert tools.run(call) == "sunny in Paris"
    assert json.loads(tools.run({"function": {"name": "weather", "arguments": '{"town": "x"}'}}))["error"].startswith("TypeError")
    assert "no tool named 'nope'" in tools.run({"function": {"name": "nope", "arguments": {}}})


def test_a_tools_file_without_docstrings_is_one_error_naming_the_function(tmp_path):
    path = tmp_path / "bad_tools.py"
    path.write_text("def shout(text: str) -> str:\n    return text.upper()\n")
    with pytest.raises(DataError, match=f"--tools {path}: function shout has no schema .*docstring"):
        load_tools(str(path))
    with pytest.raises(DataError, match="neither a built-in tool"):
        load_tools("abacus")


@pytest.mark.parametrize("expression, value", [("17*23", "391"), ("(1 + 2) * 3 / 4", "2.25"), ("2 ** 10 % 7", "2"),
                                               ("6 × 7", "42")])
def test_the_calculator_does_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "open('x')", "'a' * 3", "2 ^ 10", "1 < 2"])
def test_the_calculator_refuses_what_is_not_arithmetic_without_running_it(expression):
    result = json.loads(load_tools("calculator").run({"function": {"name": "calculator",
                                                                   "arguments": {"expression": expression}}}))
    assert result == {"error": f"ValueError: {expression!r} is not arithmetic: use + - * / // % ** and parentheses"}


# ---- the server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tool_caller):
    _, model = tool_caller
    running = Server(model, load_tokenizer(), max_tokens_cap=256, context=1024)
    yield running
    running.stop()


def ask(client, messages, **extra):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=200,
                                          tools=load_tools("calculator").schemas, **extra)


def test_the_server_returns_the_call_then_the_answer_to_its_result(server):
    client = server.client()
    first = ask(client, [{"role": "user", "content": QUESTION}])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "Use the calculator."
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "calculator", {"expression": "17*23"})
    history = [{"role": "user", "content": QUESTION}, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": load_tools("calculator").run(call.model_dump())}]
    second = ask(client, history).choices[0]
    assert (second.finish_reason, second.message.content, second.message.tool_calls) == ("stop", "17*23 = 391.", None)


def test_streamed_deltas_add_up_to_the_whole_reply(server):
    client = server.client()
    whole = ask(client, [{"role": "user", "content": QUESTION}]).choices[0]
    chunks = list(ask(client, [{"role": "user", "content": QUESTION}], stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == whole.message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, "calculator", whole.message.tool_calls[0].function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_and_thinking_switches(server):
    client = server.client()
    question = [{"role": "user", "content": QUESTION}]
    none = ask(client, question, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.finish_reason != "tool_calls"
    named = ask(client, question, tool_choice={"type": "function", "function": {"name": "calculator"}}).choices[0]
    # The answer is made to open with that call: this model never saw it without thinking first, so it goes on
    # badly, and the malformed call comes back as text.
    assert named.message.tool_calls is None and named.finish_reason == "stop"
    assert named.message.content.startswith('<tool_call>\n{"name": "calculator", "arguments": ')
    quiet = ask(client, question, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0]
    assert getattr(quiet.message, "reasoning_content", None) is None


def test_a_call_cut_short_comes_back_as_text_and_bad_tool_requests_are_400s(server):
    import openai

    client = server.client()
    cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                         max_tokens=3, tools=load_tools("calculator").schemas,
                                         tool_choice={"type": "function", "function": {"name": "calculator"}})
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("<tool_call>")
    for bad in ({"tool_choice": {"type": "function", "function": {"name": "abacus"}}},
                {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                              "tools": load_tools("calculator").schemas, **bad})
    hello = client.chat.completions.create(model="tiny", messages=GREETING[:1], temperature=0, max_tokens=20)
    assert hello.choices[0].message.content == "Hello!"  # and it goes on serving


def test_a_call_the_server_returned_as_text_is_text_in_the_next_request(server):
    """Offered no tools, a model that writes a well-formed call gets it back as content; sent back so, it is what the
    assistant said, and the chat goes on (calls travel in "tool_calls" in OpenAI's format)."""
    written = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": written},
               {"role": "user", "content": GREETING[0]["content"]}]
    reply = server.client().chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=20)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("expression", ["4000000 ** 4000000", "9 ** 9 ** 9", "*".join(["(1000000000000 ** 64)"] * 40),
                                        "1+" * 600 + "1", "(" * 400 + "1" + ")" * 400],
                         ids=["power", "tower", "product", "long", "deep"])
def test_a_huge_number_or_expression_is_refused_at_once(expression):
    """Each would hold the process (the server with it) for seconds or minutes: Python multiplies big integers
    without letting go of the interpreter, so no thread helps."""
    import time

    tools = load_tools("calculator")
    started = time.perf_counter()
    result = json.loads(tools.run({"function": {"name": "calculator", "arguments": {"expression": expression}}}))
    assert result.keys() == {"error"} and time.perf_counter() - started < 1


def test_malformed_tool_choice_and_thinking_switches_are_400s(server):
    import httpx2

    base = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "tools": load_tools("calculator").schemas}
    for extra, words in (({"tool_choice": {"type": "function", "function": "calculator"}}, "tool_choice"),
                         ({"tool_choice": {"function": {"name": ["x"]}}}, "tool_choice"),
                         ({"chat_template_kwargs": {"enable_thinking": "false"}}, "enable_thinking")):
        response = httpx2.post(f"{server.url}/v1/chat/completions", json={**base, **extra})
        assert response.status_code == 400 and words in response.json()["error"]["message"], extra
