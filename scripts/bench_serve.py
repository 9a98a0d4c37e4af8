"""Serving throughput: aggregate output tokens/s and time to first token with N concurrent streaming clients,
against the same requests served one at a time, on the same server.

    python -m scripts.bench_serve --config configs/small.json            # random weights of that shape
    python -m scripts.bench_serve --checkpoint output/sft_dense/sft_512.pth --concurrency 1,4,8,16

Every request streams `--tokens` tokens (ignore_eos, so each decodes exactly that many). Each round runs the
one-at-a-time baseline and then every concurrency level, and rounds repeat `--rounds` times, so a neighbour
slowing the machine slows all alike; the table gives medians over the rounds. The server runs in a process
of its own, as it does in use, so the clients' parsing does not take its interpreter's time.
"""

import asyncio
import multiprocessing
import re
import statistics
import time

import httpx2
import torch
import uvicorn
from tqdm import tqdm

from dataset import load_tokenizer
from model import TinyMindForCausalLM, load_model
from model.generate import Decoder
from scripts.serve import create_app
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
    args.baseline_clients = min(max(args.levels), 8)  # the requests the one-at-a-time baseline serves in turn
    return args


async def one_request(http, index, tokens):
    """(seconds to the first token, tokens received) of one streamed chat request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Tell story number {index}."}],
            "max_tokens": tokens, "temperature": 1.0, "seed": index, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started, first, chunks = time.perf_counter(), None, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        # Raw bytes, looked at as little as possible: the client shares this machine's cores with the server.
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            if first is None and re.search(rb'"content": "[^"]', chunk):
                first = time.perf_counter() - started  # the first text, not the role chunk sent before prefill
    usage = re.findall(rb'"completion_tokens": (\d+)', b"".join(chunks))
    return first, int(usage[-1]) if usage else 0


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


def build_model(args):
    """The checkpoint, or random weights of the --config shape."""
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint) if args.checkpoint else TinyMindForCausalLM(model_config(args))
    return model.to(args.device).eval()


def serve(args):
    """The server under test, in its own process."""
    app = create_app(build_model(args), load_tokenizer(args.tokenizer_path), "bench",
                     max_batch=args.max_batch, max_queue=max(args.levels), max_tokens_cap=args.tokens)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error")


def wait_until_up(url, server, seconds=300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise SystemExit(f"error: the benchmark server exited with code {server.exitcode} before it served")
        try:
            if httpx2.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: the benchmark server did not answer {url}/health within {seconds} s")


def main(argv=None):
    args = parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    try:
        httpx2.get(f"{url}/health", timeout=1)
        raise SystemExit(f"error: something already answers on port {args.port}; pick a free one with --port")
    except httpx2.TransportError:
        pass
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(args,), daemon=True)
    server.start()
    try:
        wait_until_up(url, server)
        asyncio.run(level(url, 1, args.tokens))  # warm-up: the first request builds the decoder
        runs = measure(args, url)
    finally:
        server.terminate()
        server.join(30)
        if server.is_alive():
            server.kill()
    report(args, runs, decode_ceiling(build_model(args), args.max_batch, position=args.tokens))


@torch.no_grad()
def decode_ceiling(model, batch, position, rounds=15, steps=10):
    """How much `batch` rows can gain over one with no server around them: the decode step alone at batch 1 and
    at `batch` (the engine's `Decoder.decode`, rows at `position`), interleaved, medians:
    (milliseconds at 1, milliseconds at `batch`, batch · t1 / t_batch)."""
    decoder = Decoder(model, batch, position + 1)
    for cache in decoder.keys + decoder.values:
        cache.normal_()  # keys and values as a prefill leaves them, not stale memory
    tokens = torch.randint(3, model.config.vocab_size, (batch,), device=decoder.head.device)
    sync = torch.cuda.synchronize if decoder.head.is_cuda else (lambda: None)
    times = {1: [], batch: []}
    for _ in range(rounds):
        for rows in times:
            sync()
            started = time.perf_counter()
            for _ in range(steps):
                decoder.decode(list(range(rows)), tokens[:rows], [position] * rows)
            sync()
            times[rows].append((time.perf_counter() - started) / steps * 1e3)
    one, many = statistics.median(times[1]), statistics.median(times[batch])
    return one, many, batch * one / many


def measure(args, url):
    runs = {"one at a time": [], **{clients: [] for clients in args.levels}}
    with tqdm(total=args.rounds * len(runs), desc="serving") as bar:
        for _ in range(args.rounds):
            runs["one at a time"].append(asyncio.run(level(url, args.baseline_clients, args.tokens, sequential=True)))
            bar.update()
            for clients in args.levels:
                runs[clients].append(asyncio.run(level(url, clients, args.tokens)))
                bar.update()
    return runs


def report(args, runs, ceiling):
    shape = args.checkpoint or f"{args.config or 'flags'} (random weights)"
    if not args.checkpoint:
        with torch.device("meta"):
            shape += f", {TinyMindForCausalLM(model_config(args)).parameter_counts()[0] / 1e6:.1f}M parameters"
    print(f"\n{shape}, {args.device} "
          f"({torch.get_num_threads()} threads), --max_batch {args.max_batch}, {args.tokens} tokens per request, "
          f"medians of {args.rounds} rounds")
    reference = statistics.median(rate for rate, _ in runs["one at a time"])
    print(f"{'clients':<14} {'tokens/s':>9} {'vs one at a time':>17} {'TTFT p50':>9} {'TTFT p95':>9}")
    for name, results in runs.items():
        rate = statistics.median(rate for rate, _ in results)
        firsts = [first for _, run in results for first in run]
        label = f"{args.baseline_clients}, in turn" if name == "one at a time" else str(name)
        print(f"{label:<14} {rate:>9.1f} {rate / reference:>16.2f}x {percentile(firsts, 0.5):>8.3f}s "
              f"{percentile(firsts, 0.95):>8.3f}s")
    one, many, ratio = ceiling
    print(f"the decode step alone, no server: {one:.2f} ms at batch 1, {many:.2f} ms at batch {args.max_batch}, so "
          f"{args.max_batch} clients can gain at most {ratio:.2f}x over one at a time")


if __name__ == "__main__":
    main()
