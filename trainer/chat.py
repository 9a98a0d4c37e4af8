"""Stage 3: chat with a checkpoint (interactive, one prompt, a file of prompts), measure its perplexity, or score it
on lm-eval tasks (`--tasks`, trainer/benchmarks.py).

With `--tools` the model may call tools: each call it writes is run, its result goes back as a tool turn, and the
model goes on until it answers (at most `--max_tool_calls` rounds). `--think` / `--no-think` ask for an answer with
or without thinking; the thinking is shown dimmed, each call and result on its own line.
"""

import sys
import time
from pathlib import Path

import torch

from dataset import text_or_chat_dataset, token_bytes
from dataset.chat import THINKING_PREFIX, ReplyReader, render_chat
from model import Sampling, stream_tokens

from .distributed import say
from .errors import UserError
from .evaluate import language_model_scores
from .flags import add_benchmark_flags, add_chat_flags, add_model_flags, check_ranges, new_parser, parse
from .loading import add_checkpoint_flags, load_checkpoint_flags
from .precision import autocast_context
from .tools import load_tools


def read_prompts(args):
    """--prompt, or the lines of --prompts_file (one prompt a line); None for an interactive chat."""
    if args.prompt is not None:
        return [args.prompt]
    if not args.prompts_file:
        return None
    if not Path(args.prompts_file).is_file():
        raise UserError(f"--prompts_file {args.prompts_file}: no such file (one prompt a line)")
    prompts = [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {args.prompts_file}: no prompt in it (one prompt a line)")
    return prompts


def eval_stage(argv=None):
    parser = new_parser("Chat with a tinymind checkpoint, report its perplexity on a jsonl file, or score it on "
                        "lm-eval tasks.")
    add_model_flags(parser)
    add_checkpoint_flags(add_chat_flags(parser), "the model to chat with")
    add_benchmark_flags(parser)
    args = parse(parser, argv)
    check_ranges(args, not_negative=("max_tool_calls",))
    torch.manual_seed(args.seed)
    tools = load_tools(args.tools)
    prompts = read_prompts(args)
    model, tokenizer, checkpoint = load_checkpoint_flags(args)

    if args.tasks:
        from .benchmarks import run_benchmarks  # lm-eval loads only for this

        run_benchmarks(model, tokenizer, args, checkpoint, tools)
        return
    if args.ppl_data:
        dataset = text_or_chat_dataset(args.ppl_data, tokenizer, args.max_seq_len)
        scores = language_model_scores(model, dataset, args, token_bytes=token_bytes(tokenizer))
        say(f"perplexity on {args.ppl_data} ({type(dataset).__name__}, {len(dataset)} samples): "
            f"{scores['perplexity']:.4f}, bits per byte {scores['bits per byte']:.4f}")
        return
    if prompts is None:
        interactive_chat(model, tokenizer, args, tools)
        return
    for prompt in prompts:
        say(f"> {prompt}")
        converse(model, tokenizer, [{"role": "user", "content": prompt}], args, tools)


def converse(model, tokenizer, messages, args, tools):
    """Answer `messages`, running the tools the model calls, showing it all as it comes; the new turns."""
    new, transcript = [], Transcript()
    for _ in range(args.max_tool_calls + 1):
        prompt = render_chat(tokenizer, messages + new, tools.schemas, add_generation_prompt=True, thinking=args.think)
        reply = answer(model, tokenizer, prompt, args, transcript, bool(tools))
        new.append({"role": "assistant", **{key: value for key, value in reply.items() if value}, "content": reply["content"]})
        if not reply["tool_calls"]:
            break
        for call in reply["tool_calls"]:
            result = tools.run(call)
            transcript.show("result", result)
            new.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": result})
    transcript.end_line()
    return new


def answer(model, tokenizer, prompt, args, transcript, tools_on=False):
    """Stream the model's reply to the rendered `prompt` as it is decoded, print tokens/s, return the reply read
    back: {"reasoning_content", "content", "tool_calls"}."""
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if input_ids.shape[1] > args.max_seq_len:
        say(f"warning: the prompt is {input_ids.shape[1]} tokens; the model reads its last {args.max_seq_len} "
            "(raise --max_seq_len to keep it whole)", err=True)
        input_ids = input_ids[:, -args.max_seq_len:]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    reader = ReplyReader(tools_on, THINKING_PREFIX if args.think else "")
    started, new_tokens, text = time.perf_counter(), [], ""
    with autocast_context(args):
        for token in stream_tokens(model, input_ids.to(args.device), args.max_new_tokens, sampling, tokenizer.eos_token_id,
                                   compile=args.compile_decode):
            if int(token) == tokenizer.eos_token_id:
                break
            new_tokens.append(int(token))
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                for kind, value in reader.feed(text):
                    transcript.show(kind, value)
    for kind, value in reader.finish(text):
        transcript.show(kind, value)
    transcript.end_line()
    seconds = time.perf_counter() - started
    say(f"[{len(new_tokens)} tokens, {len(new_tokens) / max(seconds, 1e-9):.1f} tokens/s]", err=True)
    return reader.reply()


class Transcript:
    """Prints a conversation as it comes: the thinking dimmed (on a terminal), the answer on a line of its own
    after it, each tool call and result on a line of its own."""

    def __init__(self):
        self.kind, self.at_line_start = None, True

    def show(self, kind, value):
        if kind != self.kind or kind in ("tool_call", "result"):
            self.end_line()
        if kind == "reasoning":
            value = f"\033[2m{value}\033[0m" if sys.stdout.isatty() else value
        elif kind == "tool_call":
            value = f"→ {value['function']['name']}({value['function']['arguments']})\n"
        elif kind == "result":
            value = f"← {value}\n"
        self.write(value)
        self.kind = kind

    def end_line(self):
        if not self.at_line_start:
            self.write("\n")

    def write(self, text):
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.at_line_start = text.endswith("\n")


def interactive_chat(model, tokenizer, args, tools):
    say("chat with the model: /reset clears the history, Ctrl-D exits", err=True)
    history = []
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print()
            return
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        messages = ([] if args.no_history else history) + [{"role": "user", "content": text}]
        history = messages + converse(model, tokenizer, messages, args, tools)
