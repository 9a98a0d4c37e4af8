"""On-policy preference pairs for 5-dpo.py: a checkpoint's own answers as rejected, the reference answers as chosen.

DPO pays most on the model's own mistakes. For each SFT conversation of --data, the model answers the
prompt (every turn but the last, with the line's tools); where its answer ends (an answer cut off at
--max_new_tokens is left out: as a whole answer it would end where the model did not) and differs from the
reference answer, the pair {"chosen": prompt + reference, "rejected": prompt + the model's answer} goes to --out.

    python -m scripts.sample_pairs --config configs/tiny.json --checkpoint output/sft_dense/sft_128.pth \\
        --data data/sft.jsonl --out data/dpo_onpolicy.jsonl --limit 2000
"""

import json

import torch
from tqdm import tqdm

from dataset import SFTDataset
from dataset.chat import chat_messages, render_chat
from dataset.jsonl import bad_line_error, load_jsonl
from model import Sampling, atomic_write, stream_tokens
from trainer import run_cli
from trainer.distributed import say
from trainer.flags import add_model_flags, new_parser, parse
from trainer.loading import add_checkpoint_flags, load_checkpoint_flags
from trainer.precision import autocast_context


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    group = parser.add_argument_group("sampling")
    add_checkpoint_flags(group, "the model whose answers become the rejected ones")
    group.add_argument("--data", default="data/sft.jsonl", help="SFT-format jsonl whose last answers are the chosen")
    group.add_argument("--out", default="data/dpo_onpolicy.jsonl", help="where the pairs go")
    group.add_argument("--limit", type=int, default=2000, help="answer at most this many conversations")
    group.add_argument("--max_new_tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    group.add_argument("--top_p", type=float, default=0.9)
    return parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_checkpoint_flags(args)
    records = load_jsonl(args.data, SFTDataset.columns, SFTDataset.record_problem, optional=SFTDataset.optional,
                         nested=SFTDataset.nested)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    pairs, same, cut = [], 0, 0
    for record in tqdm(records.select(range(min(args.limit, len(records)))), desc="sampling answers"):
        problem = SFTDataset.record_problem(record)
        if problem:
            raise bad_line_error(args.data, SFTDataset.record_problem, problem)  # names the file and line
        conversation, tools = record["conversations"], record.get("tools")
        messages, offered = chat_messages(conversation[:-1], tools)
        prompt = render_chat(tokenizer, messages, offered, add_generation_prompt=True)
        input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with autocast_context(args):
            tokens = [int(t) for t in stream_tokens(model, input_ids[:, -args.max_seq_len:].to(args.device),
                                                   args.max_new_tokens, sampling, tokenizer.eos_token_id)]
        if tokenizer.eos_token_id not in tokens:  # cut off: as a whole answer it would end where the model did not
            cut += 1
            continue
        answer = tokenizer.decode(tokens[:tokens.index(tokenizer.eos_token_id)], skip_special_tokens=True)
        if answer.strip() == conversation[-1]["content"].strip():
            same += 1
            continue
        pair = {"chosen": conversation, "rejected": [*conversation[:-1], {"role": "assistant", "content": answer}]}
        pairs.append(pair if tools is None else {**pair, "tools": tools})

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)

    atomic_write(args.out, write)
    say(f"wrote {len(pairs)} pairs to {args.out} ({same} answers equal to the reference and {cut} cut off at "
        f"--max_new_tokens {args.max_new_tokens} were left out)")


if __name__ == "__main__":
    run_cli(main)
