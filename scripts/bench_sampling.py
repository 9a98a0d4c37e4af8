"""How the chat's sampling settings trade repetition against right answers, measured on a chat checkpoint.

    python -m scripts.bench_sampling --config configs/tiny.json --out_dir output/demo    # the demo's SFT model

For each setting (greedy, and temperature × top_p × repetition penalty): the share of repeated 4-grams in the
answers to scripts/demo_prompts.txt (the report card's repetition figure, here sampled, --samples answers each)
and the accuracy on tinymind_arithmetic (asked as chats, through lm-eval, sampling the same way). 3-eval.py's
defaults are the setting this picked on the demo model (README, "Chat defaults").
"""

import itertools
from types import SimpleNamespace

import torch
from lm_eval import simple_evaluate

from dataset.chat import render_chat
from model import Sampling, stream_tokens
from scripts.report_card import ROOT, repeated_share
from trainer import run_cli
from trainer.benchmarks import TinyMindLM, accuracies, task_manager
from trainer.flags import add_model_flags, new_parser, parse
from trainer.loading import add_checkpoint_flags, load_checkpoint_flags

SETTINGS = [(0.0, 1.0, 1.0)] + list(itertools.product((0.6, 0.85), (0.85, 0.95), (1.0, 1.1, 1.3)))


@torch.no_grad()
def sampled_answers(model, tokenizer, prompts, sampling, samples, seed, new_tokens=80):
    generator = torch.Generator().manual_seed(seed)
    replies = []
    for prompt in prompts:
        text = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids] * samples)
        rows = [[] for _ in range(samples)]
        for step in stream_tokens(model, ids, new_tokens, sampling, tokenizer.eos_token_id, generator):
            for row, token in zip(rows, step.tolist()):
                row.append(token)
        replies += [[t for t in row if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)] for row in rows]
    return replies


def main(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    group = parser.add_argument_group("sampling bench")
    add_checkpoint_flags(group, "the chat model to measure")
    group.add_argument("--samples", type=int, default=4, help="sampled answers per prompt and setting")
    group.add_argument("--limit", type=int, default=100, help="arithmetic questions per setting")
    group.add_argument("--prompts_file", default=str(ROOT / "scripts/demo_prompts.txt"))
    args = parse(parser, argv)
    model, tokenizer, checkpoint = load_checkpoint_flags(args)
    prompts = [line.strip() for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
    manager = task_manager()
    print(f"{checkpoint}: {len(prompts)} prompts × {args.samples} answers, tinymind_arithmetic ({args.limit} questions)")
    print(f"{'temperature':>11} {'top_p':>5} {'rep.pen.':>8} {'repeated 4-grams':>16} {'arithmetic':>10}")
    for temperature, top_p, penalty in SETTINGS:
        sampling = Sampling(temperature, 0, top_p, penalty)
        replies = sampled_answers(model, tokenizer, prompts, sampling, 1 if temperature == 0 else args.samples,
                                  args.seed)
        options = (f"do_sample={temperature > 0},temperature={temperature},top_p={top_p},"
                   f"repetition_penalty={penalty}")
        results = simple_evaluate(model=TinyMindLM(model, tokenizer, 16, SimpleNamespace(dtype="float32", device="cpu")),
                                  tasks=["tinymind_arithmetic"], limit=args.limit, task_manager=manager,
                                  apply_chat_template=True, gen_kwargs=options, log_samples=False, verbosity="ERROR",
                                  random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed)
        print(f"{temperature:>11} {top_p:>5} {penalty:>8} {repeated_share(replies):>16.3f} "
              f"{accuracies(results)['tinymind_arithmetic']:>10.3f}", flush=True)


if __name__ == "__main__":
    run_cli(main)
