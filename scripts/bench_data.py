"""Pretraining on a multi-GB jsonl: tokenization time, peak memory, time to the first step, and the second run.

    python -m scripts.bench_data --size_gb 2          # writes a ~2 GB jsonl from data/pretrain.jsonl, then measures

The file is the training split repeated (each copy's lines numbered, so no two lines are equal) until it reaches
`--size_gb`. `1-pretrain.py --max_steps 1` then runs on it twice, each a fresh process: the first tokenizes it
(Arrow, memory-mapped, every core), the second finds that in the cache. For each run: wall time to the end of its
first step, and the peak resident memory of the largest process (memory-mapped Arrow pages that the kernel can
drop count in it, so it is an upper bound on what the run holds).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--max_seq_len", "256"]


def write_corpus(source, out, size_bytes):
    lines = Path(source).read_text(encoding="utf-8").splitlines()
    written, copy = 0, 0
    with open(out, "w", encoding="utf-8") as f, tqdm(total=size_bytes, unit="B", unit_scale=True, desc="writing") as bar:
        while written < size_bytes:
            for line in lines:
                record = json.loads(line)
                record["text"] = f"{copy} {record['text']}"
                text = json.dumps(record, ensure_ascii=False) + "\n"
                f.write(text)
                size = len(text.encode("utf-8"))
                written += size
                bar.update(size)
            copy += 1
    return written


def run(data, out_dir, cache):
    """One `1-pretrain.py --max_steps 1` in a fresh process: (seconds, peak RSS bytes of its largest process). No
    bigram warm start: what is timed is reading the data."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "TQDM_DISABLE": "1"}
    command = [sys.executable, str(ROOT / "1-pretrain.py"), *MODEL, "--data_path", str(data), "--max_steps", "1",
               "--out_dir", str(out_dir), "--batch_size", "8", "--bigram_steps", "0"]
    started = time.perf_counter()
    # A wrapper process of its own, so the peak it reports is this run's alone.
    result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], cwd=out_dir.parent, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"error: 1-pretrain.py failed:\n{result.stderr[-2000:]}")
    peak = int(result.stdout.strip().splitlines()[-1])
    samples = re.search(r"data: ([\d,]+) samples", result.stdout + result.stderr)
    return seconds, peak, samples.group(1) if samples else "?"


PEAK_OF_CHILD = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(code)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_gb", type=float, default=2.0)
    parser.add_argument("--source", default="data/pretrain.jsonl")
    parser.add_argument("--dir", help="where the corpus and caches go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = Path(scratch)
        data = scratch / "big.jsonl"
        started = time.perf_counter()
        size = write_corpus(args.source, data, int(args.size_gb * 1e9))
        print(f"wrote {data} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s; {os.cpu_count()} cores")
        cache = scratch / "hf_cache"
        for name in ("first run (tokenizes)", "second run (cached)"):
            out_dir = scratch / "output"
            subprocess.run(["rm", "-rf", str(out_dir)], check=True)
            out_dir.mkdir()
            seconds, peak, samples = run(data, out_dir, cache)
            print(f"{name}: {seconds:.0f} s to the end of step 1, {samples} samples, peak RSS of its largest "
                  f"process {peak / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
