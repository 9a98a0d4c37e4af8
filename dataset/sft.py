"""Supervised fine-tuning data: chat conversations → chat-template token ids + a loss mask on the answers.

Each jsonl line is {"conversations": [messages], "tools": [function schemas]} ("tools" optional), in the format
`dataset/chat.py` describes: OpenAI-style messages with tool calls, tool results and thinking, or MiniMind-3's
layout of the same. The ids are exactly what the tokenizer gives for the rendered chat template, so training sees
the same framing as `3-eval.py`, the server and `model.generate` do. The model learns only what the assistant
writes: its thinking, text and tool calls, each answer with its closing <|im_end|> (so it learns to stop);
everything else (the system turn, the tool list, the user's turns, the tool results and the
`<|im_start|>assistant\n` headers) is context.
"""

import bisect

from .chat import chat_messages, chat_problem, render_chat
from .jsonl import FIX, DataError
from .tokenized import TokenizedJsonlDataset


def truncate_turns(messages, limit):
    """Each user and assistant text (and thinking) cut to `limit` characters.

    Characters are a cheap stand-in for tokens that bounds the work before tokenizing; the exact token cap is
    enforced afterwards, on the rendered template, and `limit` is set so that only a text too long to fit is cut
    here (`character_limit`). System turns, tool calls and tool results are never cut here: a cut would leave a
    broken JSON object in the prompt.
    """
    cut = []
    for message in messages:
        if message["role"] in ("user", "assistant"):
            message = {**message, "content": message["content"][:limit]}
            if "reasoning_content" in message:
                message["reasoning_content"] = message["reasoning_content"][:limit]
        cut.append(message)
    return cut


def character_limit(tokenizer, max_length):
    """The characters past which a text cannot fit in `max_length` tokens: no token of the vocabulary spans more
    than its longest entry's bytes, and a character is at least one byte."""
    return max_length * max(map(len, tokenizer.get_vocab()))


class SFTDataset(TokenizedJsonlDataset):
    """Each item is (input_ids, targets, loss_mask), at most `max_length - 1` long; the mask is 1 on answer tokens only.

    A conversation that keeps no answer token after truncation is skipped and counted in `skipped`.
    """

    columns = ("conversations", "tools")
    optional = ("tools",)
    nested = True

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False):
        self.check_tokenizer(tokenizer)
        super().__init__(path, tokenizer, max_length, skip_bad_lines)

    @staticmethod
    def check_tokenizer(tokenizer):
        if tokenizer.chat_template is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path} has no chat template; use the project's tokenizer (--tokenizer_path model/tokenizer)")

    @staticmethod
    def record_problem(record):
        problem = chat_problem(record.get("conversations"), record.get("tools"), ending="assistant")
        return problem and f"{problem}; {FIX}"

    @staticmethod
    def encode(records, tokenizer, max_length):
        encoded = {"input_ids": [], "loss_spans": []}
        for [(ids, spans)] in encode_together([[(record["conversations"], record.get("tools"))] for record in records],
                                              tokenizer, max_length):
            encoded["input_ids"].append(ids)
            encoded["loss_spans"].append(spans)
        return encoded


def encode_together(groups, tokenizer, max_length):
    """[(ids, loss_spans) of each chat] for each group of chats, (conversations, tools), that share their earlier
    exchanges, each at most `max_length` ids. Older exchanges matter least for learning the last answer, so they
    go first, from every chat of a group alike until the longest fits (a preference pair keeps one prompt on both
    sides); then each is cut to `max_length`."""
    limit = character_limit(tokenizer, max_length)
    chats = [[_exchanges(*chat_messages(conversations, tools), limit) for conversations, tools in group]
             for group in groups]
    tokenized = iter(_tokenize_chats([_chat(*chat) for group in chats for chat in group], tokenizer))
    results = []
    for group in chats:
        encoded, dropped = [next(tokenized) for _ in group], 0
        while (max(len(ids) for ids, _ in encoded) > max_length
               and min(len(exchanges) for _, exchanges, _ in group) - dropped > 1):
            dropped += 1
            encoded = _tokenize_chats([_chat(system, exchanges[dropped:], tools) for system, exchanges, tools in group],
                                      tokenizer)
        results.append([_cut_tail(ids, spans, max_length) for ids, spans in encoded])
    return results


def _exchanges(messages, tools, limit):
    """(system turns, [exchange, ...], tools): the turns cut to `limit` characters, split where each user turn
    begins an exchange."""
    messages = truncate_turns(messages, limit)
    system = messages[:1] if messages[0]["role"] == "system" else []
    exchanges = []
    for message in messages[len(system):]:
        if message["role"] == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(message)
    return system, exchanges, tools


def _chat(system, exchanges, tools):
    return system + [message for exchange in exchanges for message in exchange], tools


def _tokenize_chats(chats, tokenizer):
    """[(ids, loss_spans)] for each (messages, tools): the ids of its rendered template, spans over its answers.

    An answer's tokens are found from character positions: each answer starts where the template's generation
    prompt for the conversation so far ends and closes with the eos token that ends its turn; the offset mapping
    tells which tokens cover those characters. This follows whatever the template does rather than
    re-implementing its framing here.
    """
    rendered = [render_chat(tokenizer, messages, tools) for messages, tools in chats]
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    results = []
    for (messages, tools), text, ids, offsets in zip(chats, rendered, encoded["input_ids"], encoded["offset_mapping"]):
        token_starts = [start for start, _ in offsets]
        token_ends = [end for _, end in offsets]
        spans = []
        for answer_start, eos_at in _answer_char_spans(messages, tools, text, tokenizer):
            # A token straddling the header/answer boundary counts as answer: better one
            # header byte learned than one answer byte lost.
            first = bisect.bisect_right(token_ends, answer_start)
            closing = bisect.bisect_left(token_starts, eos_at)
            if closing == len(ids) or ids[closing] != tokenizer.eos_token_id:
                raise DataError(f"the chat template of tokenizer {tokenizer.name_or_path} does not close answers with its eos token; use the project's tokenizer (--tokenizer_path model/tokenizer)")
            spans += [first, closing + 1]
        results.append((ids, spans))
    return results


def _answer_char_spans(messages, tools, rendered, tokenizer):
    """(start, position of the closing eos token) in `rendered` for each assistant turn."""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:index], tools, add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[:index + 1], tools)
        eos_at = turn.rfind(tokenizer.eos_token)
        if not (rendered.startswith(turn) and turn.startswith(prompt) and eos_at >= len(prompt)):
            raise DataError(f"the chat template of tokenizer {tokenizer.name_or_path} does not render each answer after its generation prompt, closed by {tokenizer.eos_token}; use the project's tokenizer (--tokenizer_path model/tokenizer)")
        yield len(prompt), eos_at


def _cut_tail(ids, spans, max_length):
    """Cut the ids of the exchange that remains to `max_length` tokens. Answers that start inside keep their start;
    what follows the last of them is context for nothing and goes too, so no tool result is left cut in half."""
    if len(ids) <= max_length:
        return ids, spans
    kept = []
    for start, end in zip(spans[0::2], spans[1::2]):
        if start >= max_length:
            break
        kept += [start, min(end, max_length)]
    if not kept:
        return ids[:max_length], []
    return ids[:kept[-1]], kept
