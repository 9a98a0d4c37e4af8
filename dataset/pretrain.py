"""Pretraining data: {"text": ...} per jsonl line → <|im_start|> text <|im_end|>, a long document in several samples."""

from .jsonl import FIX, json_type
from .tokenized import TokenizedJsonlDataset


class PretrainDataset(TokenizedJsonlDataset):
    """Each item is (input_ids, targets, loss_mask), at most `max_length - 1` long; every target is trained. A document
    longer than `max_length` ids is stored whole and served as several samples (see TokenizedJsonlDataset)."""

    columns = ("text",)
    windows = True

    @staticmethod
    def record_problem(record):
        text = record.get("text")
        if text is None:
            return f'no "text" key (or it is null); pretraining lines look like {{"text": "..."}}, {FIX}'
        if not isinstance(text, str):
            return f'"text" must be a string, got {json_type(text)}; {FIX}'
        return None

    @staticmethod
    def encode(records, tokenizer, max_length):
        texts = tokenizer([record["text"] for record in records], add_special_tokens=False)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        input_ids = [[bos] + ids + [eos] for ids in texts]
        # Every real token after the first is a target; the first has nothing before it to predict it from.
        return {"input_ids": input_ids, "loss_spans": [[1, len(ids)] for ids in input_ids]}
