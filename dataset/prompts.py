"""Prompts for reinforcement learning: {"conversations": [... ending with a user turn], "answer": "..."}.

Each prompt is the chat template of its turns (and of the "tools" beside them, when the line has that key) with the
generation prompt appended, so the model continues as the assistant; `answer` is what the reward function checks a completion against, and
an optional `reward` names the registry function for this line (else the run's --reward).
"""

import json
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Features, List, Value

from .jsonl import FIX, json_type
from .chat import chat_messages, chat_problem, render_chat
from .sft import SFTDataset
from .rewards import REWARDS, number_answer
from .tokenized import TokenizedJsonlDataset


@dataclass
class PromptBatch:
    prompts: list  # 1-D tensors of token ids, one per prompt, unpadded
    answers: list  # strings
    rewards: list  # each line's reward name, or None for the run's
    indices: list  # each prompt's record index in the file, to name its line
    chats: list  # each prompt's (messages, tools or None), for rollouts that go on after a tool's result

    def __len__(self):
        return len(self.prompts)

    def to(self, device):
        return PromptBatch([prompt.to(device) for prompt in self.prompts], self.answers, self.rewards, self.indices,
                           self.chats)


class PromptDataset(TokenizedJsonlDataset):
    """Each item is (prompt ids, answer, reward name or None, record index, (messages, tools or None)); a prompt
    keeps its last `max_length` tokens."""

    columns = ("conversations", "answer", "reward", "tools")
    features = Features({"input_ids": List(Value("int32")), "loss_spans": List(Value("int32")),
                         "answer": Value("string"), "reward": Value("string"), "index": Value("int64"),
                         "chat": Value("string")})
    optional = ("reward", "tools")
    nested = True

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False):
        SFTDataset.check_tokenizer(tokenizer)
        super().__init__(path, tokenizer, max_length, skip_bad_lines)

    @staticmethod
    def record_problem(record):
        if not isinstance(record.get("answer"), str):
            return f'needs a string "answer" (what the reward checks), got {json_type(record.get("answer"))}; {FIX}'
        if record.get("reward") is not None and (not isinstance(record["reward"], str) or record["reward"] not in REWARDS):
            return f'"reward" {json.dumps(record["reward"])} is none of {", ".join(REWARDS)}; {FIX}'
        if record.get("reward") == "numeric" and number_answer(record["answer"]) is None:
            return f'"answer" {json.dumps(record["answer"], ensure_ascii=False)} is not a number, which the numeric reward needs; {FIX}'
        problem = chat_problem(record.get("conversations"), record.get("tools"), ending="user")
        return problem and f"{problem}; {FIX}"

    @staticmethod
    def encode(records, tokenizer, max_length):
        chats = [chat_messages(record["conversations"], record.get("tools")) for record in records]
        rendered = [render_chat(tokenizer, *chat, add_generation_prompt=True) for chat in chats]
        ids = [row[-max_length:] for row in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
        return {"input_ids": ids, "loss_spans": [[] for _ in ids], "answer": [record["answer"] for record in records],
                "reward": [record.get("reward") for record in records], "index": [record["_index"] for record in records],
                "chat": [json.dumps(chat, ensure_ascii=False) for chat in chats]}

    @staticmethod
    def usable(encoded):
        return np.ones(len(encoded), dtype=bool)

    def __getitem__(self, index):
        row = int(self.rows[index])
        ids = torch.from_numpy(self.samples.data.column("input_ids")[row].values.to_numpy().astype(np.int64))
        answer, reward, index, chat = (self.samples.data.column(name)[row].as_py()
                                       for name in ("answer", "reward", "index", "chat"))
        return ids, answer, reward, index, tuple(json.loads(chat))

    def collate(self, samples):
        return PromptBatch(*(list(column) for column in zip(*samples)))
