"""Chats: the message format every stage, the chat and the server share; rendering it through the tokenizer's chat
template; and reading a reply back into its thinking, its text and its tool calls.

A conversation is a list of OpenAI-format messages, with the tools it may call beside it:

    {"role": "system" | "user", "content": "..."}
    {"role": "assistant", "content": "..." or null, "reasoning_content": "...",   # thinking, optional
     "tool_calls": [{"type": "function", "function": {"name": "...", "arguments": {...} or "{...}"}}]}
    {"role": "tool", "content": "the result", "tool_call_id": "...", "name": "..."}   # id and name optional
    tools: [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {JSON schema}}}]

MiniMind-3's layout of the same is read too: tools as the system turn's "functions" (a list, or a JSON string of
one), thinking inline at the start of an answer as `<think>...</think>`, tool calls inline as
`<tool_call>{...}</tool_call>` in the answer's text. A reply is read back by the same convention (Qwen3's, the one
Hermes-style tool parsers expect): an optional leading `<think>...</think>`, then text, then
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; a block that is not such JSON stays text.
"""

import json
import uuid

from .jsonl import json_type

ROLES = ("system", "user", "assistant", "tool")
THINK = ("<think>", "</think>")
CALL = ("<tool_call>", "</tool_call>")
THINKING_PREFIX = THINK[0] + "\n"  # what the generation prompt ends with when thinking is asked for


# ---- checking what a user wrote ---------------------------------------------------------------------------


def chat_problem(turns, tools=None, ending="assistant", calls_in_text=True):
    """What is wrong with a conversation as written (turns numbered from 1), or None.

    After an optional system turn it starts with a user turn; a user turn is answered by the assistant; an assistant
    turn that calls tools is followed by one tool turn per result, and those by the assistant again. It ends with an
    assistant answer (`ending="assistant"`, training data) or with what the model is to answer (`ending="user"`: a
    user turn or tool results). `calls_in_text`: an assistant's `<tool_call>` blocks in its text are calls
    (MiniMind-3's files); else only its "tool_calls" are (OpenAI's format, where such text is what the model wrote).
    """
    if turns is None:
        return 'no "conversations" key (or it is null); lines look like {"conversations": [{"role": "user", "content": "..."}, ...]}'
    if not isinstance(turns, list) or not turns:
        return f'"conversations" must be a non-empty list of turns, got {json_type(turns) if turns else "an empty list"}'
    if tools is None and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        tools = turns[0].get("functions") or turns[0].get("tools")  # MiniMind-3 lists them on the system turn
    problem = tools_problem(tools)
    if problem:
        return problem
    for number, turn in enumerate(turns, start=1):
        problem = _turn_problem(number, turn)
        if problem:
            return problem
    order = ("after an optional system turn: user, then the assistant; an assistant turn with tool_calls is followed "
             f"by its tool results and those by the assistant (or the user); ending with {'an assistant answer' if ending == 'assistant' else 'user or tool'}")
    first = 1 if turns[0]["role"] == "system" else 0
    if first == len(turns):
        return f"the conversation holds only a system turn: {order}"
    previous = None
    for number, turn in enumerate(turns[first:], start=first + 1):
        allowed = _may_follow(previous, calls_in_text)
        if turn["role"] not in allowed:
            return f"turn {number} has role {turn['role']!r} where {' or '.join(repr(r) for r in allowed)} belongs: {order}"
        previous = turn
    last = turns[-1]["role"]
    if ending == "assistant" and last != "assistant":
        return f"the conversation must end with an assistant answer, not {last!r}: {order}"
    if ending == "user" and last not in ("user", "tool"):
        return f"the conversation must end with the user turn (or tool results) the model is to answer, not {last!r}: {order}"
    return None


def _may_follow(previous, calls_in_text):
    if previous is None:
        return ("user",)
    if previous["role"] == "user":
        return ("assistant",)
    if previous["role"] == "tool":  # the assistant answers the results; a user may also go on without that answer
        return ("tool", "assistant", "user")
    calls = previous.get("tool_calls") or (calls_in_text and
                                           inline_calls(split_thinking(previous.get("content") or "")[1])[1])
    return ("tool",) if calls else ("user",)


def _turn_problem(number, turn):
    if not isinstance(turn, dict):
        return f'turn {number} must be an object {{"role": ..., "content": ...}}, got {json_type(turn)}'
    role = turn.get("role")
    if role not in ROLES:
        return f"turn {number} has role {role!r}; roles are {', '.join(ROLES)}"
    if role == "system" and number != 1:
        return f"turn {number} has role 'system' where only turn 1 may be the system turn"
    content = turn.get("content")
    calls = _loaded(turn.get("tool_calls"))
    if role == "assistant" and content is None and calls:
        pass  # a turn that only calls tools
    elif not isinstance(content, str):
        return f'turn {number} needs a string "content", got {json_type(content)}'
    if role == "assistant":
        if turn.get("reasoning_content") is not None and not isinstance(turn["reasoning_content"], str):
            return f'turn {number}: "reasoning_content" must be a string, got {json_type(turn["reasoning_content"])}'
        if turn.get("tool_calls") is not None:
            return _calls_problem(number, calls)
    elif turn.get("tool_calls"):
        return f'turn {number}: only assistant turns carry "tool_calls", not {role!r}'
    return None


def _calls_problem(number, calls):
    shape = '[{"type": "function", "function": {"name": "...", "arguments": {...}}}]'
    if not isinstance(calls, list):
        return f'turn {number}: "tool_calls" must be a list like {shape}, got {json_type(calls)}'
    for index, call in enumerate(calls, start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f'turn {number}, tool call {index}: needs a function name, as in {shape}'
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                return f'turn {number}, tool call {index}: "arguments" is not valid JSON ({error.msg}, column {error.colno})'
            except (ValueError, RecursionError) as error:  # nested past the parser's depth, or a number too long
                return f'turn {number}, tool call {index}: "arguments" is not valid JSON ({type(error).__name__})'
        if not isinstance(arguments, dict):
            return f'turn {number}, tool call {index}: "arguments" must be a JSON object, got {json_type(arguments)}'
    return None


def tools_problem(tools):
    """What is wrong with a "tools" value (a list of function schemas, or null), or None."""
    tools = _loaded(tools)
    if tools is None:
        return None
    shape = '[{"type": "function", "function": {"name": "...", "description": "...", "parameters": {...}}}]'
    if not isinstance(tools, list):
        return f'"tools" must be a list like {shape}, got {json_type(tools)}'
    for index, tool in enumerate(tools, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f'tool {index} needs a function name, as in {shape}'
    return None


# ---- the one form every stage uses -----------------------------------------------------------------------


def chat_messages(turns, tools=None, calls_in_text=True):
    """(messages, tools) in the form the template renders, from a conversation that `chat_problem` accepts.

    Tool calls get their arguments as objects; inline thinking becomes "reasoning_content"; MiniMind-3's
    system-turn "functions" become the tools, and (`calls_in_text`) its calls written into the text become
    "tool_calls". Other keys are dropped.
    """
    tools = _loaded(tools)
    if tools is None and turns and turns[0]["role"] == "system":
        tools = _loaded(turns[0].get("functions") or turns[0].get("tools"))
    messages = []
    for turn in turns:
        message = {"role": turn["role"], "content": turn.get("content") or ""}
        if turn["role"] == "assistant":
            reasoning = turn.get("reasoning_content")
            if reasoning is None:
                reasoning, message["content"] = split_thinking(message["content"])
            if reasoning is not None:
                message["reasoning_content"] = reasoning.strip("\n")
                message["content"] = message["content"].lstrip("\n")
            calls = _loaded(turn.get("tool_calls"))
            if not calls and calls_in_text:  # MiniMind-3 writes its calls into the text
                message["content"], calls = inline_calls(message["content"])
            if calls:
                message["tool_calls"] = [_call(call) for call in calls]
        messages.append(message)
    return messages, [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools or []] or None


def split_thinking(text):
    """(thinking or None, the rest) of an answer that may open with `<think>...</think>`."""
    stripped = text.lstrip()
    if stripped.startswith(THINK[0]) and THINK[1] in stripped:
        thinking, rest = stripped[len(THINK[0]):].split(THINK[1], 1)
        return thinking, rest
    return None, text


def inline_calls(text):
    """(the text without them, the calls) for tool calls written into an answer's text (its thinking already split
    off); a text whose calls are all malformed, or that is still inside a think block, is left whole."""
    if CALL[0] not in text or text.lstrip().startswith(THINK[0]):
        return text, []
    events = parse_reply(text)
    calls = [value for kind, value in events if kind == "tool_call"]
    return ("".join(value for kind, value in events if kind == "content"), calls) if calls else (text, [])


def _call(call):
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    return {"type": "function", "function": {"name": function["name"],
                                             "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments}}


def _loaded(value):
    """A JSON value that may arrive as a string of JSON (MiniMind-3 writes "functions" so)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


# ---- rendering -------------------------------------------------------------------------------------------


def render_chat(tokenizer, messages, tools=None, add_generation_prompt=False, thinking=None):
    """The chat template's text for `messages` (and the tools they may call).

    `thinking` False asks the model to answer without thinking (the prompt ends with an empty think block), True
    makes it think (the prompt opens the think block: read the reply with `THINKING_PREFIX` before it), None leaves
    it to the model. It is passed as both `enable_thinking` (Qwen3's name) and
    `open_thinking` (MiniMind-3's), so either family's template follows it.
    """
    switches = {} if thinking is None else {"enable_thinking": thinking, "open_thinking": thinking}
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **switches)


def results_framing(tokenizer, answer, results):
    """The text the chat template writes after an answer's end token that called tools: the results' turn and the
    next answer's header. Rendered on a stand-in conversation, since the framing depends only on these turns."""
    question = [{"role": "user", "content": "?"}]
    before = render_chat(tokenizer, question + [answer])
    after = render_chat(tokenizer, question + [answer] + results, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(f"the chat template of tokenizer {tokenizer.name_or_path} renders a conversation "
                         "differently once tool results follow it")
    eos = tokenizer.eos_token
    return before[before.rfind(eos) + len(eos):] + after[len(before):]


# ---- reading a reply -------------------------------------------------------------------------------------


class ReplyReader:
    """A reply's text, as it grows, → what is new in it: ("reasoning", text), ("content", text), ("tool_call", call).

    `feed` takes the whole text decoded so far and returns the events it adds; `finish` flushes what was held. Text
    that may still become a tag, and whitespace that may still frame one, waits for the next feed. A `<tool_call>`
    block waits until it closes, then is a call when it holds {"name": ..., "arguments": {...}}, else it is given
    back as content: a malformed call is never lost, nor an error.
    """

    def __init__(self, tools=True, prefix=""):
        self.tools, self.prefix = tools, prefix  # tools False: <tool_call> is plain text; prefix: text forced before
        self.sent = []  # the events as sent so far: texts grow in place, calls are whole

    def feed(self, text):
        return self._news(parse_reply(self.prefix + text, self.tools, final=False))

    def finish(self, text):
        return self._news(parse_reply(self.prefix + text, self.tools, final=True))

    def reply(self):
        """{"reasoning_content": str or None, "content": str, "tool_calls": [...]} of what was read so far (the
        calls with the ids their events had)."""
        reasoning = [value for kind, value in self.sent if kind == "reasoning"]
        return {"reasoning_content": reasoning[0] if reasoning else None,
                "content": "".join(value for kind, value in self.sent if kind == "content"),
                "tool_calls": [value for kind, value in self.sent if kind == "tool_call"]}

    def _news(self, events):
        news = []
        for index, (kind, value) in enumerate(events):
            if index < len(self.sent):
                if kind != "tool_call" and len(value) > len(self.sent[index][1]):
                    news.append((kind, value[len(self.sent[index][1]):]))
                    self.sent[index] = (kind, value)
            else:
                if kind == "tool_call":
                    value = {"id": f"call_{uuid.uuid4().hex[:24]}", **value}
                news.append((kind, value))
                self.sent.append((kind, value))
        return news


def parse_reply(text, tools=True, final=True):
    """[(kind, value)] of a reply: its thinking, its text pieces and its tool calls, in order. With `final` False the
    text may still grow: what may yet change is left out, so each result extends the one before."""
    events = []
    stripped = text.lstrip()
    if stripped.startswith(THINK[0]):
        body = stripped[len(THINK[0]):]
        end = body.find(THINK[1])
        if end < 0:
            kept = body if final else body[:len(body) - _partial_tag(body, THINK[1])]
            return _text_event([], "reasoning", kept.strip("\n") if final else kept.lstrip("\n").rstrip("\n"))
        _text_event(events, "reasoning", body[:end].strip("\n"))
        text = body[end + len(THINK[1]):]
    elif not final and THINK[0].startswith(stripped):
        return []  # may still open a think block
    while text:
        at = text.find(CALL[0]) if tools else -1
        body = text[at + len(CALL[0]):] if at >= 0 else ""
        end = body.find(CALL[1])
        if at < 0 or end < 0:  # no call, or one still open
            if final:  # the tail is the reply's own: it frames no call
                _text_event(events, "content", _framed(events, text))
            else:  # whitespace at the end may yet frame a call
                kept = text[:at] if at >= 0 else text[:len(text) - _partial_tag(text, CALL[0])] if tools else text
                _text_event(events, "content", _framed(events, kept).rstrip())
            break
        call = parse_call(body[:end])
        block = text[at:at + len(CALL[0]) + end + len(CALL[1])]
        _text_event(events, "content", _framed(events, text[:at]).rstrip() if call else _framed(events, text[:at] + block))
        if call:
            events.append(("tool_call", call))
        text = body[end + len(CALL[1]):]
    return events


def _framed(events, text):
    """Text that follows thinking or a call loses the whitespace that framed them. Text after a call that had text
    before it starts on a new line: the two read apart once the call is taken out of the content."""
    if not events or events[-1][0] == "content":
        return text
    text = text.lstrip()
    after_text = events[-1][0] == "tool_call" and any(kind == "content" for kind, _ in events)
    return "\n" + text if text and after_text else text


def _text_event(events, kind, text):
    if text:
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + text)
        else:
            events.append((kind, text))
    return events


def _partial_tag(text, tag):
    """How many characters at the end of `text` could be the start of `tag`."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


def parse_call(text):
    """The OpenAI tool call (less its id) a `<tool_call>` block's inside spells, or None when it is not
    {"name": ..., "arguments": {...}}."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, nested past the parser's depth, or a number too long
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = _loaded(value.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return {"type": "function", "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def read_reply(text, tools=True, prefix=""):
    """{"reasoning_content": str or None, "content": str, "tool_calls": [...]} of a whole reply."""
    reader = ReplyReader(tools, prefix)
    reader.finish(text)
    return reader.reply()
