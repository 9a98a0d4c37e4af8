"""Stage 3: chat with a checkpoint (interactive, one prompt, a file of prompts) or measure its perplexity."""

import sys
import time
from pathlib import Path

import torch
from transformers import TextStreamer

from dataset import PretrainDataset, SFTDataset, load_tokenizer

from .checkpoint import load_model
from .errors import UserError
from .evaluate import perplexity
from .flags import add_model_flags, checkpoint_path, model_config, new_parser, parse


def eval_parser():
    parser = new_parser("Chat with a tinymind checkpoint, or report its perplexity on a jsonl file.")
    add_model_flags(parser)
    group = parser.add_argument_group("chat")
    group.add_argument("--checkpoint", help="a .pth/.safetensors or a Hugging Face directory "
                                            "(default: the matching output/sft_*/sft_*.pth)")
    group.add_argument("--prompt", help="answer this once and exit")
    group.add_argument("--prompts_file", help="answer each line of this file")
    group.add_argument("--no_history", action="store_true", help="interactive chat forgets earlier turns")
    group.add_argument("--max_new_tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.85, help="0 means greedy")
    group.add_argument("--top_p", type=float, default=0.85)
    group.add_argument("--top_k", type=int, default=0, help="0 means no top-k cut")
    group.add_argument("--repetition_penalty", type=float, default=1.0)
    group.add_argument("--ppl_data", help="report perplexity on this pretrain- or SFT-format jsonl instead")
    group.add_argument("--batch_size", type=int, default=8, help="batch size for --ppl_data")
    return parser


def eval_stage(argv=None):
    args = parse(eval_parser(), argv)
    torch.manual_seed(args.seed)
    checkpoint = args.checkpoint or checkpoint_path("sft", args)
    model = load_model(checkpoint, fallback_config=model_config(args)).to(args.device).eval()
    tokenizer = load_tokenizer(args.tokenizer_path)
    print(f"loaded {checkpoint} ({model.parameter_counts()[0] / 1e6:.2f}M parameters)", file=sys.stderr)

    if args.ppl_data:
        dataset_class = SFTDataset if is_sft_file(args.ppl_data) else PretrainDataset
        dataset = dataset_class(args.ppl_data, tokenizer, args.max_seq_len)
        print(f"perplexity on {args.ppl_data} ({dataset_class.__name__}, {len(dataset)} samples): "
              f"{perplexity(model, dataset, args):.4f}")
        return
    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    else:
        interactive_chat(model, tokenizer, args)
        return
    for prompt in prompts:
        print(f"> {prompt}")
        answer(model, tokenizer, [{"role": "user", "content": prompt}], args)


def is_sft_file(path):
    """SFT files hold `conversations`, pretrain files `text`; the first non-blank line tells which."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except OSError as err:
        raise UserError(f"--ppl_data {path}: {err.strerror}") from None
    return '"conversations"' in first


def answer(model, tokenizer, messages, args):
    """Stream the model's reply to `messages`, print tokens/s, and return the reply text."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -args.max_seq_len:].to(args.device)
    sampling = args.temperature > 0
    started = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p if sampling else None,
        top_k=args.top_k if sampling else None,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    new_tokens = output[0, input_ids.shape[1]:]
    seconds = time.perf_counter() - started
    print(f"[{len(new_tokens)} tokens, {len(new_tokens) / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def interactive_chat(model, tokenizer, args):
    print("chat with the model: /reset clears the history, Ctrl-D exits", file=sys.stderr)
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
