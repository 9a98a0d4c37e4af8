"""Supervised fine-tuning data: chat conversations → chat-template token ids + a loss mask on the answers.

Each jsonl line is {"conversations": [{"role": ..., "content": ...}, ...]}: an optional
system turn, then user/assistant turns alternating, starting with user and ending with
assistant. The ids are exactly what the tokenizer gives for the rendered chat template,
so training sees the same framing as `3-eval.py` and `model.generate` do. The model
learns only the assistant answers, each with its closing <|im_end|> (so it learns to
stop); everything else, the `<|im_start|>assistant\\n` header included, is context.
"""

import bisect

from .jsonl import FIX, DataError, json_type
from .tokenized import TokenizedJsonlDataset



def turn_order_problem(turns, last_role):
    """What is wrong with the roles of `turns` (a list of turn objects), or None: after an optional system turn,
    user and assistant alternate, starting with user and ending with `last_role`."""
    order = f"after an optional system turn, turns alternate user/assistant, starting with user and ending with {last_role}"
    first_dialogue_turn = 1 if turns[0].get("role") == "system" else 0
    dialogue = turns[first_dialogue_turn:]
    for offset, turn in enumerate(dialogue):
        expected = ("user", "assistant")[offset % 2]
        if turn.get("role") != expected:
            return f"turn {first_dialogue_turn + offset + 1} has role {turn.get('role')!r} where {expected!r} belongs: {order}; {FIX}"
    if not dialogue:
        return f"the conversation holds only a system turn: {order}; {FIX}"
    if dialogue[-1].get("role") != last_role:
        wanted = "an assistant answer" if last_role == "assistant" else "the user turn the model is to answer"
        return f"the conversation must end with {wanted}, not {dialogue[-1].get('role')!r}: {order}; {FIX}"
    return None


def truncate_qa(question, answer, max_length):
    """Cut question and answer to `max_length // 2` characters each.

    Characters are a cheap stand-in for tokens that bounds the work before tokenizing;
    the exact token cap is enforced afterwards, on the rendered template.
    """
    limit = max_length // 2
    return question[:limit], answer[:limit]


class SFTDataset(TokenizedJsonlDataset):
    """Each item is (input_ids, targets, loss_mask), at most `max_length - 1` long; the mask is 1 on answer tokens only.

    A conversation that keeps no answer token after truncation is skipped and counted in `skipped`.
    """

    columns = ("conversations",)

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False):
        self.check_tokenizer(tokenizer)
        super().__init__(path, tokenizer, max_length, skip_bad_lines)

    @staticmethod
    def check_tokenizer(tokenizer):
        if tokenizer.chat_template is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path} has no chat template; use the project's tokenizer (--tokenizer_path model/tokenizer)")

    @staticmethod
    def record_problem(record):
        turns = record.get("conversations")
        return SFTDataset.turns_problem(turns) or turn_order_problem(turns, "assistant")

    @staticmethod
    def turns_problem(turns):
        """What is wrong with the shape of a "conversations" value (not its roles' order), or None."""
        if turns is None:
            return f'no "conversations" key (or it is null); lines look like {{"conversations": [{{"role": "user", "content": "..."}}, ...]}}, {FIX}'
        if not isinstance(turns, list) or not turns:
            return f'"conversations" must be a non-empty list of turns, got {json_type(turns) if turns else "an empty list"}; {FIX}'
        for number, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                return f'turn {number} must be an object {{"role": ..., "content": ...}}, got {json_type(turn)}; {FIX}'
            if not isinstance(turn.get("content"), str):
                return f'turn {number} needs a string "content", got {json_type(turn.get("content"))}; {FIX}'
        return None

    @staticmethod
    def encode(records, tokenizer, max_length):
        chats = [_truncated_chat(record["conversations"], max_length) for record in records]
        encoded = {"input_ids": [], "loss_spans": []}
        for (system, pairs), (ids, spans) in zip(chats, _tokenize_chats([_messages(*chat) for chat in chats], tokenizer)):
            # Older exchanges matter least for learning the last answer, so they go first.
            while len(ids) > max_length and len(pairs) > 1:
                pairs = pairs[1:]
                [(ids, spans)] = _tokenize_chats([_messages(system, pairs)], tokenizer)
            ids, spans = _cut_tail(ids, spans, max_length)
            encoded["input_ids"].append(ids)
            encoded["loss_spans"].append(spans)
        return encoded


def _truncated_chat(turns, max_length):
    """(system turns, [(question, answer), ...]) with every question and answer cut by `truncate_qa`."""
    system = [{"role": "system", "content": turns[0]["content"]}] if turns[0]["role"] == "system" else []
    dialogue = turns[len(system):]
    pairs = [truncate_qa(question["content"], answer["content"], max_length) for question, answer in zip(dialogue[0::2], dialogue[1::2])]
    return system, pairs


def _messages(system, pairs):
    exchanges = [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}] for question, answer in pairs]
    return system + [message for exchange in exchanges for message in exchange]


def _tokenize_chats(chats, tokenizer):
    """[(ids, loss_spans)] for each message list: the ids of its rendered template, spans over its answers.

    An answer's tokens are found from character positions: each answer starts where the
    template's generation prompt for the conversation so far ends, and the offset mapping
    tells which tokens cover those characters. This follows whatever the template does
    rather than re-implementing its framing here.
    """
    rendered = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in chats]
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    results = []
    for messages, text, ids, offsets in zip(chats, rendered, encoded["input_ids"], encoded["offset_mapping"]):
        token_starts = [start for start, _ in offsets]
        token_ends = [end for _, end in offsets]
        spans = []
        for answer_start, answer_end in _answer_char_spans(messages, text, tokenizer):
            # A token straddling the header/answer boundary counts as answer: better one
            # header byte learned than one answer byte lost.
            first = bisect.bisect_right(token_ends, answer_start)
            closing = bisect.bisect_left(token_starts, answer_end)
            if closing == len(ids) or ids[closing] != tokenizer.eos_token_id:
                raise DataError(f"the chat template of tokenizer {tokenizer.name_or_path} does not close answers with its eos token; use the project's tokenizer (--tokenizer_path model/tokenizer)")
            spans += [first, closing + 1]
        results.append((ids, spans))
    return results


def _answer_char_spans(messages, rendered, tokenizer):
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True))
        end = start + len(message["content"])
        if rendered[start:end] != message["content"]:
            raise DataError(f"the chat template of tokenizer {tokenizer.name_or_path} does not put answers right after its generation prompt; use the project's tokenizer (--tokenizer_path model/tokenizer)")
        yield start, end


def _cut_tail(ids, spans, max_length):
    """Cut the ids of a single remaining exchange to `max_length`; its answer keeps its start or the sample keeps nothing."""
    if len(ids) <= max_length:
        return ids, spans
    [answer_start, answer_end] = spans
    if answer_start >= max_length:
        return ids[:max_length], []
    return ids[:max_length], [answer_start, min(answer_end, max_length)]
