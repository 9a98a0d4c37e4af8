"""Serving throughput: aggregate output tokens/s and time to first token with N concurrent streaming clients,
against the same requests served one at a time, on the same server in this process.

    python -m scripts.bench_serve --config configs/small.json            # random weights of that shape
    python -m scripts.bench_serve --checkpoint output/sft_dense/sft_512.pth --concurrency 1,4,8,16

Every request streams `--tokens` tokens (ignore_eos, so each decodes exactly that many). Each round runs the
one-at-a-time baseline and then every concurrency level, and rounds repeat `--rounds` times, so a neighbour
slowing the machine slows all alike; the table gives medians over the rounds.
"""

import asyncio
import statistics
import threading
import time

import httpx2
import torch
import uvicorn
from tqdm import tqdm

from dataset import load_tokenizer
from model import TinyMindForCausalLM
from scripts.serve import create_app
from trainer import load_model
from trainer.flags import add_model_flags, model_config, new_parser, parse


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--checkpoint", help="weights to serve (default: random init of the --config shape)")
    group.add_argument("--concurrency", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    group.add_argument("--tokens", type=int, default=128, help="tokens each request streams")
    group.add_argument("--rounds", type=int, default=3)
    group.add_argument("--max_batch", type=int, default=8, help="the server's --max_batch")
    group.add_argument("--port", type=int, default=8765)
    args = parse(parser, argv)
    args.levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    return args


async def one_request(http, index, tokens):
    """(seconds to the first token, tokens received) of one streamed chat request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Tell story number {index}."}],
            "max_tokens": tokens, "temperature": 1.0, "seed": index, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started, first, received = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - started  # the first text, not the role chunk sent before prefill
            if '"usage"' in line and '"completion_tokens"' in line:
                received = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return first, received


async def level(url, clients, tokens, sequential=False):
    """(aggregate tokens/s, [time to first token]) for `clients` requests, together or one after another."""
    async with httpx2.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        if sequential:
            results = [await one_request(http, i, tokens) for i in range(clients)]
        else:
            results = await asyncio.gather(*(one_request(http, i, tokens) for i in range(clients)))
        seconds = time.perf_counter() - started
    return sum(received for _, received in results) / seconds, [first for first, _ in results]


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint) if args.checkpoint else TinyMindForCausalLM(model_config(args))
    app = create_app(model.to(args.device).eval(), load_tokenizer(args.tokenizer_path), "bench",
                     max_batch=args.max_batch, max_queue=max(args.levels), max_tokens_cap=args.tokens)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(level(url, 1, args.tokens))  # warm-up: the first request builds the decoder

    baseline_clients = max(args.levels) if max(args.levels) <= 8 else 8
    runs = {"one at a time": [], **{clients: [] for clients in args.levels}}
    with tqdm(total=args.rounds * len(runs), desc="serving") as bar:
        for _ in range(args.rounds):
            runs["one at a time"].append(asyncio.run(level(url, baseline_clients, args.tokens, sequential=True)))
            bar.update()
            for clients in args.levels:
                runs[clients].append(asyncio.run(level(url, clients, args.tokens)))
                bar.update()
    server.should_exit = True

    shape = args.checkpoint or f"{args.config or 'flags'} (random weights)"
    print(f"\n{shape}, {model.parameter_counts()[0] / 1e6:.1f}M parameters, {args.device} "
          f"({torch.get_num_threads()} threads), --max_batch {args.max_batch}, {args.tokens} tokens per request, "
          f"medians of {args.rounds} rounds")
    reference = statistics.median(rate for rate, _ in runs["one at a time"])
    print(f"{'clients':<14} {'tokens/s':>9} {'vs one at a time':>17} {'TTFT p50':>9} {'TTFT p95':>9}")
    for name, results in runs.items():
        rate = statistics.median(rate for rate, _ in results)
        firsts = [first for _, run in results for first in run]
        label = f"{baseline_clients}, in turn" if name == "one at a time" else str(name)
        print(f"{label:<14} {rate:>9.1f} {rate / reference:>16.2f}x {percentile(firsts, 0.5):>8.3f}s "
              f"{percentile(firsts, 0.95):>8.3f}s")


if __name__ == "__main__":
    main()
