"""Stage 3: chat with a checkpoint (interactive, one prompt, a file of prompts) or measure its perplexity."""

import sys
import time
from pathlib import Path

import torch

from dataset import text_or_chat_dataset, token_bytes
from model import Sampling, stream_tokens

from .distributed import say
from .evaluate import language_model_scores
from .flags import add_chat_flags, add_model_flags, new_parser, parse
from .loading import add_checkpoint_flags, load_checkpoint_flags
from .precision import autocast_context


def eval_stage(argv=None):
    parser = new_parser("Chat with a tinymind checkpoint, or report its perplexity on a jsonl file.")
    add_model_flags(parser)
    add_checkpoint_flags(add_chat_flags(parser), "the model to chat with")
    args = parse(parser, argv)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_checkpoint_flags(args)

    if args.ppl_data:
        dataset = text_or_chat_dataset(args.ppl_data, tokenizer, args.max_seq_len)
        scores = language_model_scores(model, dataset, args, token_bytes=token_bytes(tokenizer))
        say(f"perplexity on {args.ppl_data} ({type(dataset).__name__}, {len(dataset)} samples): "
            f"{scores['perplexity']:.4f}, bits per byte {scores['bits per byte']:.4f}")
        return
    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    else:
        interactive_chat(model, tokenizer, args)
        return
    for prompt in prompts:
        say(f"> {prompt}")
        answer(model, tokenizer, [{"role": "user", "content": prompt}], args)


def answer(model, tokenizer, messages, args):
    """Stream the model's reply to `messages` as it is decoded, print tokens/s, and return the reply text."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -args.max_seq_len:].to(args.device)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    started = time.perf_counter()
    new_tokens, shown = [], ""
    with autocast_context(args):
        for token in stream_tokens(model, input_ids, args.max_new_tokens, sampling, tokenizer.eos_token_id):
            if int(token) == tokenizer.eos_token_id:
                break
            new_tokens.append(int(token))
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    sys.stdout.write("\n")
    seconds = time.perf_counter() - started
    say(f"[{len(new_tokens)} tokens, {len(new_tokens) / max(seconds, 1e-9):.1f} tokens/s]", err=True)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def interactive_chat(model, tokenizer, args):
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
        reply = answer(model, tokenizer, messages, args)
        history = messages + [{"role": "assistant", "content": reply}]
