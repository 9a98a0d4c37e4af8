"""Train tinymind's byte-level BPE tokenizer on the pretraining corpus.

Byte-level BPE never meets an unknown character, so Chinese, English and anything else
round-trip exactly. Before the merges, text is cut into pieces that no merge crosses (`--split`): by default
GPT-2's byte-level pattern (a space joins the letters after it, punctuation stands apart), the shipped tokenizer's;
`--split llama3`, Llama-3's pattern, which keeps one leading non-letter with each run of letters (a space, or
punctuation such as a Chinese comma), digits in threes and newlines with the spaces before them. At 6,400 tokens
Llama-3's carries 7% more bytes a token on held-out English and Chinese prose (3.40 against 3.17), so a model
generates that much more text per token, but a model pretrained with it learned no more per byte (docs/learning.md,
"The tokenizer's split"). Three special tokens come first, at fixed ids:
    0 <|endoftext|>   padding and unknown
    1 <|im_start|>    beginning of a document or a chat turn (bos)
    2 <|im_end|>      end of a document or a chat turn (eos)
Encoding adds none of them: the datasets add bos/eos themselves. The result is saved in
the Hugging Face format with a ChatML chat template, so
`transformers.AutoTokenizer.from_pretrained(out_dir)` and `apply_chat_template` work.
At the end it prints the compression on the held-out corpus (bytes and characters per token,
Chinese and English documents apart) beside the shipped tokenizer's (`model/tokenizer/`): bytes
per token is what a training row of fixed length carries, so it is the figure to compare.

Fitting the tokenizer to your own corpus is the first step of pretraining on it: train with
`1-pretrain.py --tokenizer_path DIR` once, and every later stage, the chat, the server and the
exports take the tokenizer from beside the weights.

Usage:
    python -m scripts.prepare_data                  # makes data/pretrain.jsonl first
    python -m scripts.train_tokenizer               # the shipped tokenizer: vocab 6400 -> model/tokenizer
    python -m scripts.train_tokenizer --vocab_size 32000 --max_chars 20000000 --out_dir /tmp/tok
    python -m scripts.train_tokenizer --data my/pretrain.jsonl --out_dir my/tokenizer   # fitted to your corpus
"""

import argparse
import random
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset import PretrainDataset
from dataset.jsonl import parse_lines
from model.gguf_export import LLAMA3_SPLIT
from model.weights import atomic_folder
from scripts.data.pipeline import cjk_share

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The project's chat template (ChatML, with tools and thinking in Qwen3's convention): a refitted tokenizer keeps it.
SHIPPED = Path(__file__).resolve().parent.parent / "model" / "tokenizer"
CHAT_TEMPLATE = (SHIPPED / "chat_template.jinja").read_text()
SPLITS = ("gpt2", "llama3")  # the first is the default


def read_texts(path: Path) -> list[str]:
    """The "text" of every line, read as the pretraining dataset reads it (blank lines skipped); a bad line ends
    the program with one line naming it."""
    if not path.exists():
        sys.exit(f"train_tokenizer: {path} not found; run `python -m scripts.prepare_data` first or pass --data")
    texts = []
    for line_number, record, problem in parse_lines(path):
        problem = problem or PretrainDataset.record_problem(record)
        if problem:
            sys.exit(f"train_tokenizer: {path}, line {line_number}: {problem}")
        texts.append(record["text"])
    return texts


def sample_chars(texts: list[str], max_chars: int | None, seed: int) -> list[str]:
    """A random subset of the documents holding about max_chars characters."""
    if not max_chars:
        return texts
    sample, total = [], 0
    for text in random.Random(seed).sample(texts, len(texts)):
        if total >= max_chars:
            break
        sample.append(text)
        total += len(text)
    return sample


def splitter(split: str):
    """The pieces BPE merges within, each then spelled in GPT-2's byte alphabet (see the module's docstring)."""
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train(texts: list[str], vocab_size: int, split: str = SPLITS[0]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = splitter(split)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Saved and checked in a temporary folder swapped in for `out_dir`: a failed check or a crash leaves the
    tokenizer there before whole."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
        # The default cleanup deletes spaces before punctuation, which breaks decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )
    atomic_folder(out_dir, lambda tmp: (wrapped.save_pretrained(tmp), check(tmp)))


def check(out_dir: Path) -> None:
    """The saved tokenizer behaves as the rest of tinymind assumes, or we stop here."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    sample = "床前明月光，疑是地上霜。 To be, or not to be: that is the question.\n  1998年 tinymind ！"
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample, "decode(encode(s)) does not give s back"
    assert tokenizer.encode("<|im_start|>") == [1], "<|im_start|> is not the single id 1"
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [1, 2, 0]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", chat


def compression(tokenizer, texts: list[str]) -> dict[str, tuple[float, float, int]]:
    """(UTF-8 bytes per token, characters per token, documents) of a Hugging Face tokenizer on `texts`: all of
    them, and the Chinese and English documents apart (by their share of CJK characters)."""
    groups = {"all": texts, "Chinese": [t for t in texts if cjk_share(t) > 0.3],
              "English": [t for t in texts if cjk_share(t) <= 0.3]}
    result = {}
    for language, group in groups.items():
        tokens = sum(map(len, tokenizer(group, add_special_tokens=False)["input_ids"])) if group else 0
        chars, size = sum(map(len, group)), sum(len(t.encode("utf-8")) for t in group)
        result[language] = (size / max(tokens, 1), chars / max(tokens, 1), len(group))
    return result


def report_compression(fitted, shipped, val_path: Path) -> None:
    """The fitted tokenizer's compression on held-out text beside the shipped one's (each a Hugging Face
    tokenizer or its folder)."""
    texts = read_texts(val_path)
    rows = {name: compression(AutoTokenizer.from_pretrained(t) if isinstance(t, (str, Path)) else t, texts)
            for name, t in (("fitted", fitted), ("shipped", shipped))}
    print(f"held-out compression on {val_path} (bytes per token, characters per token):")
    for language, (_, _, documents) in rows["fitted"].items():
        if documents:
            print(f"  {language:8s} {documents:6d} docs   " + "   ".join(
                f"{name} {rows[name][language][0]:.2f} B/tok {rows[name][language][1]:.2f} ch/tok" for name in rows))
    gain = rows["fitted"]["all"][0] / rows["shipped"]["all"][0]
    print(f"  a row of fixed length carries {gain:.2f}x the text with the fitted tokenizer")


def fit(data: Path, out_dir: Path, vocab_size: int, max_chars: int | None = None, seed: int = 42,
        split: str = SPLITS[0]) -> None:
    """Train a tokenizer on the jsonl `data` and save it, checked, in `out_dir`."""
    texts = sample_chars(read_texts(data), max_chars, seed)
    print(f"training a {vocab_size}-token BPE ({split} split) on {len(texts)} documents, {sum(map(len, texts))} chars")
    save(train(texts, vocab_size, split), out_dir)
    print(f"saved to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/pretrain.jsonl", help="pretraining jsonl to learn the merges from")
    parser.add_argument("--val_data", default=None,
                        help="jsonl to measure compression on (default: <data>_val.jsonl)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--out_dir", default="model/tokenizer")
    parser.add_argument("--max_chars", type=int, default=None,
                        help="train on a random sample of about this many characters (faster)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--split", choices=SPLITS, default=SPLITS[0],
                        help="how text is cut before the merges: GPT-2's pattern (the shipped tokenizer's), or "
                             "Llama-3's (more bytes a token)")
    parser.add_argument("--compare_with", default=str(SHIPPED),
                        help="the tokenizer to compare compression with (default: the shipped one)")
    args = parser.parse_args()

    data, out_dir = Path(args.data), Path(args.out_dir)
    shipped = AutoTokenizer.from_pretrained(args.compare_with)  # read before a refit may overwrite it
    fit(data, out_dir, args.vocab_size, args.max_chars, args.seed, args.split)
    val_path = Path(args.val_data) if args.val_data else data.with_name(f"{data.stem}_val.jsonl")
    if val_path.exists():
        report_compression(out_dir, shipped, val_path)


if __name__ == "__main__":
    main()
