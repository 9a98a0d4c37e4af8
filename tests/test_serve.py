"""scripts/serve.py through the official openai client: answers equal 3-eval's, batching changes none, bad requests
get their 4xx while good ones go on, keys, back-pressure and disconnects."""

import asyncio
import json
import threading
import time

import httpx2
import openai
import pytest
import torch

from dataset import load_tokenizer
from dataset.chat import read_reply
from model import TinyMindForCausalLM, fast_generate, save_weights
from model.engine import Engine
from scripts.serve import ChatRequest, parse_args
from trainer.errors import UserError

from conftest import MODEL, Server, greedy, run_stage, tiny_config

PROMPTS = ["你好", "What is the capital of France?", "床前明月光的下一句是？", "Tell me a story.",
           "1 + 1 = ?", "李白是谁？", "Hello!", "画蛇添足是什么意思？"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1)).eval()
    path = tmp_path_factory.mktemp("serve") / "tiny.pth"
    save_weights(model.state_dict(), model.config, path)
    return path, model


@pytest.fixture(scope="module")
def server(checkpoint):
    _, model = checkpoint
    running = Server(model, load_tokenizer(), max_batch=8, max_queue=16, max_tokens_cap=64)
    yield running
    running.stop()


def streamed(client, prompt, max_tokens=16):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_answers_equal_3_eval_greedy_and_usage_counts_tokens(server, checkpoint, tmp_path, tokenizer):
    path, model = checkpoint
    client = server.client()
    answer = greedy(client, "你好")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason in ("stop", "length")
    assert streamed(client, "你好") == answer.choices[0].message.content

    shell = run_stage("3-eval.py", *MODEL, "--checkpoint", path, "--prompt", "你好", "--temperature", 0,
                      "--max_new_tokens", 16, cwd=tmp_path)
    assert shell.stdout == f"> 你好\n{answer.choices[0].message.content}\n"

    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"]
    generated = fast_generate(model, torch.tensor([prompt_ids]), 16, eos_token_id=tokenizer.eos_token_id)[0, len(prompt_ids):]
    completion = len([t for t in generated.tolist() if t != tokenizer.eos_token_id and t != 0])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), completion)
    assert answer.usage.total_tokens == len(prompt_ids) + completion


def test_eight_concurrent_streams_each_equal_their_solo_answer(server):
    client = server.client()
    solo = [streamed(client, prompt) for prompt in PROMPTS]
    results = [None] * len(PROMPTS)

    def run(index):
        results[index] = streamed(server.client(), PROMPTS[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == solo


def test_raw_completions_and_models_and_health(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt="长" * 3000, max_tokens=5)
    assert too_long.value.body["param"] == "prompt" and "context of 2048 tokens" in too_long.value.body["message"]
    assert [m.id for m in client.models.list()] == ["tiny"]
    text = client.completions.create(model="tiny", prompt="床前明月光", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason in ("stop", "length") and text.usage.completion_tokens <= 5
    assert httpx2.get(f"{server.url}/health").json()["status"] == "ok"


def test_raw_completions_of_a_tokenizer_without_a_begin_token(checkpoint):
    """Qwen3's tokenizer (a Hugging Face directory the server loads) has no BOS: the prompt is its text alone."""
    import copy

    tokenizer = copy.deepcopy(load_tokenizer())
    tokenizer.bos_token = None
    running = Server(checkpoint[1], tokenizer)
    try:
        text = running.client().completions.create(model="tiny", prompt="床前明月光", max_tokens=5, temperature=0)
        assert text.usage.prompt_tokens == len(tokenizer("床前明月光", add_special_tokens=False).input_ids)
    finally:
        running.stop()


NESTED = {"type": "object"}
for _ in range(400):  # past Python's recursion limit in the template's rendering
    NESTED = {"type": "object", "properties": {"a": NESTED}}
BAD = [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "where 'user' belongs"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode(),
     400, "where 'assistant' belongs"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "gpt-9"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(),
     400, "temperature"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(),
     400, "cap"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "长" * 3000}]}).encode(), 400,
     "context of 2048 tokens"),
    (b"x" * (2 << 20), 413, "bytes"),
    (b"[" * 100_000, 400, "not valid JSON"),  # nested past the parser's depth
    (b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),  # past Python's digit limit
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "z" * 200_000}).encode(),
     400, "stop"),
    (json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "calculator", "arguments": "[" * 100_000}}]},
        {"role": "tool", "content": "1"}]}).encode(), 400, "arguments"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-40}).encode(),
     400, "repetition_penalty"),  # it would divide the logits past float's range
    # lone surrogates: JSON spells them, UTF-8 cannot
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi \ud800"}]}).encode(), 400,
     "messages.0.content: holds a lone surrogate"),
    (json.dumps({"model": "x\ud800", "messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model: holds"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": NESTED}}]}).encode(), 400, "chat template"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}).encode(), 400,
     "only text parts are supported"),
]


def test_bad_requests_get_their_status_and_error_json_while_a_good_one_succeeds(server):
    client = server.client()
    good = {}
    worker = threading.Thread(target=lambda: good.setdefault("answer", greedy(client, "Tell me a story.", 48)))
    worker.start()
    for body, status, words in BAD:
        response = httpx2.post(f"{server.url}/v1/chat/completions", content=body,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == status, (body[:80], response.text)
        error = response.json()["error"]
        assert words in error["message"] and {"message", "type", "param", "code"} <= set(error)
    chunked = httpx2.post(f"{server.url}/v1/chat/completions", content=(b"x" * (64 << 10) for _ in range(32)),
                          headers={"Content-Type": "application/json"}, timeout=30)  # 2 MiB with no Content-Length
    assert chunked.status_code == 413 and "bytes" in chunked.json()["error"]["message"]
    worker.join()
    assert good["answer"].choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_an_api_key_is_required_when_set(checkpoint):
    _, model = checkpoint
    running = Server(model, load_tokenizer(), api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            greedy(running.client("wrong"), "hi", 2)
        assert greedy(running.client("sesame"), "hi", 2).choices[0].message.content is not None
        assert httpx2.get(f"{running.url}/v1/models").status_code == 401
    finally:
        running.stop()


def test_a_full_server_says_429_and_a_disconnect_frees_the_slot_streaming_or_not(checkpoint):
    _, model = checkpoint
    running = Server(model, load_tokenizer(), max_batch=1, max_queue=0, max_tokens_cap=2000)
    # While `hold` is set the engine's thread waits before each decode step, so the first request keeps its slot
    # however loaded the cores are (else its 2,000 tokens can all be decoded before the second request arrives).
    engine, hold = running.app.state.engine, threading.Event()
    step = engine._step

    def held_step():
        while hold.is_set():
            time.sleep(0.01)
        step()

    engine._step = held_step

    async def scenario():
        async with httpx2.AsyncClient(base_url=running.url, timeout=60) as http:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                    "temperature": 1.0, "stream": True, "ignore_eos": True}  # it holds the slot until it is let go
            hold.set()
            async with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                async for _ in stream.aiter_lines():
                    break  # the first event: the request holds the only slot
                busy = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
                hold.clear()
            # the client went away mid-stream: its slot is free for the next request
            for _ in range(100):
                if (await http.get("/health")).json()["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            after = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert after.status_code == 200, after.text
        # a client that gives up on a long non-streaming answer frees the slot as well, long before the 2000
        # tokens it asked for would have been decoded
        async with httpx2.AsyncClient(base_url=running.url, timeout=60) as http:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(http.post("/v1/chat/completions", json={**body, "stream": False}), 0.5)
        async with httpx2.AsyncClient(base_url=running.url, timeout=60) as http:
            for _ in range(100):  # within 5 s, on cores other tests load too
                if (await http.get("/health")).json()["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await http.get("/health")).json()["running"] == 0

    try:
        asyncio.run(scenario())
    finally:
        running.stop()


def test_a_stop_string_ends_the_answer_before_it_even_across_tokens(server):
    client = server.client()
    full = greedy(client, "Tell me a story.", 24).choices[0].message.content
    stop = full[4:9]  # a few characters, likely spread over tokens
    cut = greedy(client, "Tell me a story.", 24, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                                 max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == full[:full.index(stop)]


def test_a_model_failing_mid_stream_ends_the_stream_with_an_error_event(checkpoint, monkeypatch):
    import model.generate

    decode, steps = model.generate.Decoder.decode, []

    def failing(self, rows, tokens, positions):
        steps.append(len(rows))
        if len(steps) == 3:
            raise RuntimeError("out of memory (simulated)")
        return decode(self, rows, tokens, positions)

    monkeypatch.setattr(model.generate.Decoder, "decode", failing)
    running = Server(checkpoint[1], load_tokenizer())
    try:
        stream = running.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="the model failed on this request .RuntimeError: out of memory"):
            for _ in stream:
                pass
        monkeypatch.setattr(model.generate.Decoder, "decode", decode)
        assert greedy(running.client(), "hi").choices[0].finish_reason in ("stop", "length")  # still serving
    finally:
        running.stop()


def test_a_step_failing_outside_any_request_ends_its_requests_and_the_engine_serves_on(checkpoint, monkeypatch):
    """On CUDA a device error raised by one kernel surfaces at the next read of the device, the step's one transfer
    of its tokens: its requests end with the error instead of waiting forever on a dead engine thread."""
    import model.engine

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return sample(*args, **kwargs)

    sample = model.engine.Engine._sample
    monkeypatch.setattr(model.engine.Engine, "_sample", staticmethod(failing))
    running = Server(checkpoint[1], load_tokenizer())
    try:
        with pytest.raises(openai.APIError, match="device-side assert"):
            greedy(running.client(), "hi", extra_body={"ignore_eos": True})
        assert greedy(running.client(), "hi").choices[0].finish_reason in ("stop", "length")  # still serving
    finally:
        running.stop()


def test_a_tiny_temperature_decodes_greedily_and_text_parts_read_as_their_text(server):
    client = server.client()
    tiny = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=16, temperature=1e-40)  # a 500 when logits / it overflowed
    assert tiny.choices[0].message.content == greedy(client, "Tell me a story.").choices[0].message.content
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]
    assert greedy(client, parts).choices[0].message.content == greedy(client, "Tell me\na story.").choices[0].message.content


def test_a_completion_prompt_with_a_lone_surrogate_is_a_400_naming_it(server):
    response = httpx2.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": "hi \\udc00"}',
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_server_bug_is_a_json_500_and_the_server_goes_on(server, monkeypatch):
    import scripts.serve

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(scripts.serve, "chat_messages", broken)
    response = httpx2.post(f"{server.url}/v1/chat/completions", timeout=30,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert greedy(server.client(), "hi", 2).choices[0].message.content is not None


def test_a_named_tool_choice_opens_the_call_as_json_whatever_the_name():
    name = 'say "hi"'
    request = ChatRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                          "tools": [{"type": "function", "function": {"name": name}}],
                                          "tool_choice": {"type": "function", "function": {"name": name}}})
    reply = read_reply('{"x": 1}}\n</tool_call>', prefix=request.reply_prefix())
    assert [call["function"] for call in reply["tool_calls"]] == [{"name": name, "arguments": '{"x": 1}'}]


@pytest.mark.parametrize("flag", ["--max_batch", "--context", "--max_tokens_cap"])
def test_a_size_below_one_is_refused_at_startup(flag):
    with pytest.raises(UserError, match=f"^{flag} 0: must be at least 1$"):
        parse_args([flag, "0"])
    with pytest.raises(ValueError, match="at least 1 slot"):  # an engine of no slots would spin, its requests waiting
        Engine(TinyMindForCausalLM(tiny_config()), None, max_batch=0)
