"""Serve a checkpoint over an OpenAI-compatible API, with a chat page, decoding many requests together.

    python -m scripts.serve --config configs/tiny.json --checkpoint output/sft_dense/sft_128.pth
    # then: http://127.0.0.1:8000/ in a browser, or any OpenAI client with base_url http://127.0.0.1:8000/v1

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET / (chat page), and for
the page's tools (--tools) GET /v1/tinymind/tools and POST /v1/tinymind/tools/call.
Requests take max_tokens (or max_completion_tokens), temperature, top_p, stop, seed, stream, and tinymind's top_k,
repetition_penalty and ignore_eos. A message's content is text or a list of text parts. Chats may carry tools,
tool_choice (auto, none, required or a named function), assistant tool_calls and role "tool" results, and
chat_template_kwargs {"enable_thinking": false}; replies give the thinking as reasoning_content and the calls as
tool_calls (finish_reason "tool_calls"), streamed as OpenAI streams them; a call the model writes malformed comes back
as text. Every active request decodes in one batch (model/engine.py); a bad request gets a 4xx in OpenAI's error
format and the others go on.
"""

import asyncio
import json
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from dataset.chat import THINKING_PREFIX, ReplyReader, chat_messages, chat_problem, read_reply, render_chat
from model import Sampling
from model.engine import Engine
from model.engine import Request as EngineRequest
from model.generate import LEAST_REPETITION_PENALTY
from trainer import run_cli
from trainer.distributed import say
from trainer.flags import add_model_flags, check_ranges, new_parser, parse
from trainer.loading import add_checkpoint_flags, load_checkpoint_flags
from trainer.tools import load_tools

PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20
# Every new token is checked against each stop's prefixes (what to hold back), work that grows with the stop's square.
MAX_STOP_CHARS = 512


class APIError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status, message, kind="invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---- requests -----------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def text_of_parts(cls, content):
        """OpenAI's content parts [{"type": "text", "text": ...}, ...] as one text, joined by newlines as vLLM
        joins them: the model reads text alone."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ValueError('only text parts are supported: [{"type": "text", "text": "..."}]')
        return "\n".join(part["text"] for part in content)


class Sampled(BaseModel):
    """The fields both endpoints share, with the bounds a request must keep."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=LEAST_REPETITION_PENALTY, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # decode exactly max_tokens (for benchmarks), as vLLM's extension does

    def stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops) or max(map(len, stops), default=0) > MAX_STOP_CHARS:
            raise APIError(400, f"stop: at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
        return stops


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model may write several calls either way
    chat_template_kwargs: dict | None = None  # {"enable_thinking": false}, as vLLM and SGLang take it

    @model_validator(mode="after")
    def turns_in_order(self):
        # OpenAI's format: calls travel in "tool_calls"; a <tool_call> block in an answer's text is text the model
        # wrote where it was offered no tools (the server returns it as content), not a call awaiting results
        problem = chat_problem([message.model_dump(exclude_none=True) for message in self.messages], self.tools,
                               ending="user", calls_in_text=False)
        if problem:
            raise ValueError(f"messages: {problem}" if problem.startswith(("turn", "the conversation")) else problem)
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice: set only with tools")
        if isinstance(self.tool_choice, dict):
            function = self.tool_choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str):
                raise ValueError('tool_choice: give {"type": "function", "function": {"name": "..."}}')
            if name not in {(tool.get("function") or tool).get("name") for tool in self.tools}:
                raise ValueError(f"tool_choice: {name!r} is none of the tools' names")
        if not isinstance((self.chat_template_kwargs or {}).get("enable_thinking", False), bool):
            raise ValueError("chat_template_kwargs.enable_thinking: true or false")
        return self

    def thinking(self):
        """The template's thinking switch: off when a call is forced (the answer opens with it), else as asked."""
        return False if self.forced() else (self.chat_template_kwargs or {}).get("enable_thinking")

    def reply_prefix(self):
        """What the answer is read with before its first token: the opened think block, or the forced call."""
        return THINKING_PREFIX if self.thinking() else self.forced()

    def forced(self):
        """The text the answer must start with: the opening of a call, when tool_choice demands one."""
        if self.tool_choice == "required":
            return '<tool_call>\n{"name": "'
        if isinstance(self.tool_choice, dict):
            name = json.dumps(self.tool_choice["function"]["name"], ensure_ascii=False)  # a quote in it stays JSON
            return f'<tool_call>\n{{"name": {name}, "arguments": '
        return ""


class CompletionRequest(Sampled):
    prompt: str


class ToolCall(BaseModel):
    """A call the chat page asks the server to run: {"function": {"name": ..., "arguments": "{...}"}}."""

    model_config = ConfigDict(extra="ignore")
    function: dict


# ---- the app ------------------------------------------------------------------------------------------


def create_app(model, tokenizer, model_name, max_batch=8, max_queue=16, context=2048, max_tokens_cap=1024,
               api_key=None, tools=None):
    engine = Engine(model, tokenizer.eos_token_id, max_batch=max_batch, max_queue=max_queue, context=context)
    context = engine.max_len

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)  # the server stops: the engine's thread ends with it

    app = FastAPI(title="tinymind", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.mailbox = engine, None

    @app.exception_handler(APIError)
    async def api_error(request, err):
        return error_response(err.status, err.message, err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return error_response(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404 else
                              "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(request, err):  # a bug of ours: the client still gets OpenAI's format (uvicorn logs it)
        return error_response(500, f"the server failed on this request ({type(err).__name__})", "server_error")

    app.add_middleware(Guard, api_key=api_key)

    async def read(request, kind, check_model=True):
        raw = bytearray()
        async for part in request.stream():  # a chunked body has no Content-Length to check up front
            raw += part
            if len(raw) > MAX_BODY_BYTES:  # stop reading here rather than hold all of it
                raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an integer past Python's digit limit, nesting
            raise APIError(400, f"the body is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        where = lone_surrogate(body)
        if where is not None:
            raise APIError(400, f"{where}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                                "not text", param=where)
        try:
            parsed = kind.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ())) or "body"
            raise APIError(400, f"{where}: {first.get('msg', 'invalid')}".replace("Value error, ", ""),
                           param=where) from None
        if check_model and parsed.model != model_name:
            raise APIError(404, f"the model '{parsed.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return parsed

    def start(request, prompt_ids, max_tokens):
        if len(prompt_ids) >= context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, over the model's context of {context} "
                                f"tokens", param="messages" if isinstance(request, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = max_tokens or min(max_tokens_cap, context - len(prompt_ids))
        if max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {max_tokens_cap}",
                           param="max_tokens")
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens {max_tokens}: together over "
                                f"the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        sampling = Sampling(request.temperature, request.top_k, request.top_p, request.repetition_penalty)
        if app.state.mailbox is None or app.state.mailbox.loop is not asyncio.get_running_loop():
            app.state.mailbox = Mailbox(asyncio.get_running_loop())  # the loop serving this app
        stream = TokenStream(tokenizer, request.stops(), app.state.mailbox)
        engine_request = EngineRequest(prompt_ids, max_tokens, sampling, stream.push, seed=request.seed,
                                       ignore_eos=request.ignore_eos)
        stream.engine_request = engine_request
        if not engine.submit(engine_request):
            raise APIError(429, f"all {max_batch} slots are decoding and {max_queue} requests wait: retry shortly",
                           "rate_limit_error")
        return stream

    async def respond(raw, request, prompt_ids, max_tokens, reply):
        stream = start(request, prompt_ids, max_tokens)

        def usage():
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": stream.tokens,
                    "total_tokens": len(prompt_ids) + stream.tokens}

        if not request.stream:
            answer, gone = asyncio.ensure_future(stream.collect()), asyncio.ensure_future(disconnected(raw))
            try:
                await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:  # a client that went away (or a cancelled handler) frees the slot
                gone.cancel()
                if not answer.done():
                    engine.cancel(stream.engine_request)
                    answer.cancel()
            if not answer.done():
                return Response(status_code=499)  # nobody is there to read it
            return JSONResponse({**reply.whole(*answer.result()), "usage": usage()})

        async def events():
            try:
                yield sse(reply.first())
                # Under ASGI 2.3 (uvicorn's) Starlette watches for the disconnect and cancels this generator.
                try:
                    async for piece, reason in stream:
                        for chunk in reply.chunks(piece, reason):
                            yield sse(chunk)
                except APIError as err:  # the status line went out with the first chunk: the error is an event
                    yield sse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                         "code": err.code}})
                    yield "data: [DONE]\n\n"
                    return
                if (request.stream_options or {}).get("include_usage"):
                    yield sse({**reply.envelope(reply.chunk_kind), "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees its slot
                engine.cancel(stream.engine_request)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        request = await read(raw, ChatRequest)
        offered = request.tools if request.tool_choice != "none" else None
        messages, tools = chat_messages([message.model_dump(exclude_none=True) for message in request.messages], offered,
                                        calls_in_text=False)
        try:
            prompt = render_chat(tokenizer, messages, tools, add_generation_prompt=True, thinking=request.thinking())
        except (RecursionError, TypeError) as err:  # tools nested past Python's recursion limit, a value it cannot take
            raise APIError(400, f"messages and tools: the chat template cannot render them ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
        prompt_ids = tokenizer(prompt + request.forced(), add_special_tokens=False).input_ids
        return await respond(raw, request, prompt_ids, request.max_completion_tokens or request.max_tokens,
                             ChatReply(model_name, bool(tools), request.reply_prefix()))

    @app.post("/v1/completions")
    async def completions(raw: Request):
        request = await read(raw, CompletionRequest)
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]  # Qwen3's tokenizer has none
        prompt_ids = bos + tokenizer(request.prompt, add_special_tokens=False).input_ids
        return await respond(raw, request, prompt_ids, request.max_tokens, TextReply(model_name))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tinymind"}]}

    @app.get("/v1/tinymind/tools")
    async def offered_tools():  # for the chat page, which runs the calls through the next endpoint
        return {"tools": tools.schemas if tools else []}

    @app.post("/v1/tinymind/tools/call")
    async def run_tool(raw: Request):
        call = await read(raw, ToolCall, check_model=False)
        if not tools:
            raise APIError(404, "this server offers no tools (start it with --tools)", "not_found_error")
        return {"content": await asyncio.to_thread(tools.run, call.model_dump())}

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


class Guard:
    """Every request's first check, before its body is read: the body's size and, with --api_key, the key. Plain
    ASGI rather than Starlette's BaseHTTPMiddleware, which would copy every streamed chunk through a task."""

    def __init__(self, app, api_key=None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = self.refusal(scope, {name.decode("latin-1"): value.decode("latin-1")
                                           for name, value in scope["headers"]})
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope, headers):
        length = headers.get("content-length") or "0"
        if not length.isdigit():
            return error_response(400, "the Content-Length header is not a number")
        if int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return error_response(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                      "authentication_error", code="invalid_api_key")
        return None


class Mailbox:
    """Hands items from the engine's thread to the event loop with one wake-up for all that arrive together:
    a decode step emits a token for every running request, and waking the loop costs a system call."""

    def __init__(self, loop):
        self.loop, self.items, self.lock, self.waking = loop, [], threading.Lock(), False

    def post(self, queue, item):  # on the engine's thread
        with self.lock:
            self.items.append((queue, item))
            if self.waking:
                return
            self.waking = True
        self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self):  # on the event loop
        with self.lock:
            items, self.items, self.waking = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


async def disconnected(raw):
    """Returns when the client of request `raw`, whose body was read, goes away."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class TextReply:
    """A text completion as it goes out: whole, or as chunks of text."""

    kind, chunk_kind, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model_name):
        self.model_name, self.ident, self.created = model_name, f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, kind=None):
        return {"id": self.ident, "object": kind or self.kind, "created": self.created, "model": self.model_name}

    def first(self):
        return self._chunk("", None)

    def chunks(self, piece, reason):
        return [self._chunk(piece, reason)]

    def _chunk(self, piece, reason):
        return {**self.envelope(), "choices": [{"index": 0, "text": piece or "", "finish_reason": reason}]}

    def whole(self, text, reason):
        return {**self.envelope(), "choices": [{"index": 0, "text": text, "finish_reason": reason}]}


class ChatReply(TextReply):
    """A chat completion as it goes out: the thinking as `reasoning_content`, the text as `content`, the calls the
    model wrote as `tool_calls` (finish_reason "tool_calls"), whole or as deltas the way OpenAI streams them."""

    kind, chunk_kind, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model_name, tools_on, forced=""):
        super().__init__(model_name)
        self.tools_on, self.forced = tools_on, forced
        self.reader, self.text, self.calls = ReplyReader(tools_on, forced), "", 0

    def first(self):
        return self._delta({"role": "assistant", "content": ""}, None)

    def chunks(self, piece, reason):
        self.text += piece or ""
        events = self.reader.feed(self.text) if reason is None else self.reader.finish(self.text)
        chunks = [self._delta(self._event_delta(kind, value), None) for kind, value in events]
        if reason is not None:
            chunks.append(self._delta({}, "tool_calls" if self.calls and reason == "stop" else reason))
        return chunks

    def _event_delta(self, kind, value):
        if kind == "reasoning":
            return {"reasoning_content": value}
        if kind == "content":
            return {"content": value}
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, **value}]}

    def _delta(self, delta, reason):
        return {**self.envelope(self.chunk_kind), "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    def whole(self, text, reason):
        reply = read_reply(text, self.tools_on, self.forced)
        message = {"role": "assistant", "content": reply["content"] or (None if reply["tool_calls"] else ""),
                   **({"reasoning_content": reply["reasoning_content"]} if reply["reasoning_content"] is not None else {}),
                   **({"tool_calls": reply["tool_calls"]} if reply["tool_calls"] else {})}
        reason = "tool_calls" if reply["tool_calls"] and reason == "stop" else reason
        return {**self.envelope(), "choices": [{"index": 0, "message": message, "finish_reason": reason}]}


def lone_surrogate(body):
    """Where in a parsed JSON body (a dotted path) a string, value or key, holds a lone surrogate, or None: JSON's
    "\\ud800" escape parses, but UTF-8 cannot encode it, so the tokenizer or the reply would fail on it."""
    pending = [("", body)]
    while pending:  # a loop, not recursion: a body may nest as deep as the JSON parser allows
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                pending += [(where, key), (where, item)]
        elif isinstance(value, list):
            pending += [(f"{path}.{index}", item) for index, item in enumerate(value)]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return path.encode(errors="backslashreplace").decode()  # a key's own surrogate, written out
    return None


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TokenStream:
    """Tokens from the engine's thread → text pieces on the event loop, cut at the first stop string."""

    def __init__(self, tokenizer, stops, mailbox):
        self.tokenizer, self.stops, self.mailbox = tokenizer, stops, mailbox
        self.queue = asyncio.Queue()
        self.ids, self.sent, self.tokens, self.done = [], "", 0, False
        # The first `settled` ids spell exactly `settled_text` (whole characters), so each new token decodes only
        # the ids after them instead of the whole answer again.
        self.settled, self.settled_text = 0, ""
        self.engine_request = None

    def push(self, token, reason):  # on the engine's thread
        self.mailbox.post(self.queue, (token, reason))

    async def __aiter__(self):
        """(new text, None) as it decodes, then (the rest, finish reason). Text that may begin a stop string is
        held back until it is known not to."""
        while not self.done:
            token, reason = await self.queue.get()
            if token is None:
                self.done = True
                if reason.startswith("error"):
                    raise APIError(500, f"the model failed on this request ({reason[7:]})", "server_error")
                yield self.text()[len(self.sent):], "length" if reason == "length" else "stop"
                return
            self.ids.append(token)
            self.tokens += 1
            text = self.text()
            cut = min((text.find(stop) for stop in self.stops if stop in text), default=-1)
            if cut >= 0:
                self.done = True
                self.engine_request.cancelled = True
                yield text[len(self.sent):cut], "stop"
                return
            if text.endswith("\ufffd"):
                continue  # the rest of a multi-byte character is still to come
            self.settled, self.settled_text = len(self.ids), text
            safe = len(text) - max((k for stop in self.stops for k in range(1, min(len(stop), len(text) + 1))
                                    if text.endswith(stop[:k])), default=0)
            if safe > len(self.sent):
                piece, self.sent = text[len(self.sent):safe], text[:safe]
                yield piece, None

    def text(self):
        return self.settled_text + self.tokenizer.decode(self.ids[self.settled:], skip_special_tokens=True)

    async def collect(self):
        pieces, reason = [], None
        async for piece, reason in self:
            pieces.append(piece)
        return "".join(pieces), reason


# ---- the command line ---------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    group = parser.add_argument_group("server")
    add_checkpoint_flags(group, "the model to serve")
    group.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api_key", help="require Authorization: Bearer KEY on every /v1 request")
    group.add_argument("--max_batch", type=int, default=8, help="requests decoded together")
    group.add_argument("--max_queue", type=int, default=16, help="requests that may wait for a slot; then 429")
    group.add_argument("--context", type=int, default=2048, help="longest prompt + completion (the KV cache size)")
    group.add_argument("--max_tokens_cap", type=int, default=1024, help="the most tokens one request may ask for")
    group.add_argument("--model_name", help="the model id clients send (default: the checkpoint's file stem)")
    group.add_argument("--tools", help="tools the chat page offers the model and runs here (as 3-eval.py --tools): "
                       "built-in names (calculator) and Python files of functions, comma-separated")
    args = parse(parser, argv)
    check_ranges(args, at_least_one=("max_batch", "context", "max_tokens_cap"), not_negative=("max_queue",))
    return args


def main(argv=None):
    args = parse_args(argv)
    tools = load_tools(args.tools)
    model, tokenizer, checkpoint = load_checkpoint_flags(args)
    if args.dtype != "float32":  # bf16 on GPUs that have it (the --dtype default there): half the weight reads
        model = model.to(getattr(torch, args.dtype))
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = args.model_name or Path(checkpoint).stem
    torch.manual_seed(args.seed)
    app = create_app(model, tokenizer, name, args.max_batch, args.max_queue, args.context, args.max_tokens_cap,
                     args.api_key, tools)
    say(f"serving {checkpoint} as '{name}' on http://{args.host}:{args.port}/ (OpenAI API under /v1)", err=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
