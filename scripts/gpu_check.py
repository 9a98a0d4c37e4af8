"""One prepared check of tinymind on a GPU: what a user's `1-pretrain.py` and chat get from it, in one table.

    python -m scripts.gpu_check                      # make gpu-check: one GPU, a few minutes
    python -m scripts.gpu_check --quick --device cpu # the same code end to end in seconds (the tests run it)

Rows: the device and torch; the bf16 matmul peak it measures (MFU is against it); which SDPA kernel the
training shapes run (causal, and under the document mask of rows packed with --pack isolated); training steps of configs/small.json (dense) and configs/moe.json, eager and compiled,
AdamW and Muon, as tokens/s, MFU, host syncs per step (CUDA's sync debug mode, over the timed steps) and peak
memory; the peak memory of the loss over a 151,936-token vocabulary (Qwen3's) at 32 × 512 positions, chunked
(tinymind's) and as one float32 cross-entropy; decoding tokens/s at batch 1 and 8, tinymind's fast decoder
against transformers' `generate` on the same weights as a stock Llama, greedy, equal tokens, and the server's
engine through its compiled decode step (a CUDA graph on CUDA) against its eager decoder; last, within the
budget, `1-pretrain.py --model_type moe` itself for 60 steps, its own tokens/s from its log.

It needs torch and transformers only (the tinymind packages it imports need nothing else), so it runs on a
machine that lacks `datasets`, `fastapi` or `openai` (the `1-pretrain.py` row, which needs `datasets`, then
says it was skipped). The training step of the other rows is the loop's step reduced to its device work
(forward, loss, backward, clipping, optimizer, the one read of loss and gradient norm).
"""

import argparse
import csv
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from model import Sampling, TinyMindConfig, TinyMindForCausalLM, fast_generate, masked_cross_entropy, token_cross_entropy
from model.convert import llama_config
from model.model import attend, causal_mask
from model.engine import Engine, Request
from model.muon import BatchedMuon, is_hidden_matrix

ROOT = Path(__file__).resolve().parent.parent
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "n_routed_experts", "num_experts_per_tok", "n_shared_experts")
QWEN3_VOCAB = 151_936


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps: checks the code, not the speed")
    parser.add_argument("--json", help="also write the rows to this file (rewritten after every row)")
    parser.add_argument("--budget_s", type=float, default=480,
                        help="rows not started within this many seconds are reported as skipped")
    parser.add_argument("--profile_dir", help="write the busiest kernels of the compiled training steps and of "
                                              "batch-1 decoding here, one text table each")
    return parser.parse_args(argv)


class Report:
    """The table as it grows: each row is printed as it is measured and the JSON rewritten, a row that fails
    says why and the others go on, and rows not started by the deadline say so: a run cut short keeps what
    it measured."""

    def __init__(self, json_path, budget_s):
        self.rows, self.json_path = [], json_path
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s

    def add(self, row):
        self.rows.append(row)
        print(f"row at {time.perf_counter() - self.started:.0f} s: "
              + " · ".join(f"{key} {value}" for key, value in row.items() if value not in (None, "")), flush=True)
        if self.json_path:
            partial = Path(f"{self.json_path}.partial")
            partial.write_text(json.dumps(self.rows, indent=1))
            os.replace(partial, self.json_path)

    def attempt(self, check, measure):
        """Add the rows `measure()` returns, or one row named `check` saying it failed or was skipped."""
        if time.perf_counter() > self.deadline:
            self.add({"check": check, "note": "skipped: past --budget_s"})
            return
        try:
            rows = measure()
        except Exception as err:  # one broken row must not cost the rest of the table
            traceback.print_exc()
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            self.add({"check": check, "note": f"failed: {type(err).__name__}: {reason}"})
            return
        for row in rows:
            self.add(row)


def profile(function, device, path, steps=3):
    """The kernels `function` spends its time in over `steps` calls, as torch.profiler's table, into `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            function()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device, repeats):
    """Median seconds of `function()` over `repeats` calls, after one untimed call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, quick):
    """bf16 matmul FLOP/s this device reaches on large square matrices: the denominator of MFU."""
    size = 512 if quick else 8192
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, 3 if quick else 20)


def sdpa_kernel(device, config, seq, documents=False):
    """The attention kernel SDPA picks for the training shapes through the model's own attention core (bf16 under
    autocast on CUDA): causal, or (`documents`) under the mask of rows packed with --pack isolated, two documents a
    row, where grouped-query heads may leave SDPA only its math kernel."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, config.num_attention_heads, seq, config.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(2, config.num_key_value_heads, seq, config.head_dim, device=device, dtype=dtype)
            for _ in range(2))
    mask = None
    if documents:
        document = (torch.arange(seq, device=device) >= seq // 2).int() + 1
        mask = causal_mask(document.expand(2, seq), 2, seq, 0, device, look=False)
    with torch.profiler.profile() as profile:
        attend(q, k, v, mask, causal=mask is None)
    names = [event.name for event in profile.events() if "attention" in event.name or "_sdpa" in event.name]
    kernels = [name for name in names if name != "aten::scaled_dot_product_attention"]
    return kernels[0].replace("aten::", "") if kernels else "math (unfused)"


def model_shapes(quick):
    if quick:
        tiny = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 6400}
        return {"dense": tiny, "moe": {**tiny, "use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                       "n_shared_experts": 1}}
    shapes = {}
    for kind, preset in (("dense", "small"), ("moe", "moe")):
        fields = json.loads((ROOT / "configs" / f"{preset}.json").read_text())
        shapes[kind] = {key: fields[key] for key in SHAPE_KEYS if key in fields} | {"use_moe": kind == "moe"}
    return shapes


class Step:
    """A training step of `model` on random tokens as trainer/loop.py takes it: autocast forward, chunked loss,
    backward, clipping, the optimizers (fused AdamW; Muon's Newton-Schulz compiled with the model, as `--compile`
    does) skipping a non-finite step on the device, and no read of the device unless asked (a log row's)."""

    def __init__(self, model, forward, optimizer_name, batch, seq, device, compiled):
        self.model, self.forward, self.device = model, forward, device
        named = [(name, p) for name, p in model.named_parameters()]
        matrices = [p for name, p in named if is_hidden_matrix(name, p)] if optimizer_name == "muon" else []
        rest = [p for name, p in named if not (optimizer_name == "muon" and is_hidden_matrix(name, p))]
        self.optimizers = [torch.optim.AdamW(rest, lr=1e-5, fused=True)]
        if matrices:
            self.optimizers.append(BatchedMuon(matrices, lr=1e-5, adjust_lr_fn="match_rms_adamw", compile=compiled))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=generator).to(device)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]
        self.mask = torch.ones_like(self.targets)

    def __call__(self, read=False):
        """One step; `read`: wait for its loss and gradient norm (as the trainer does for a log row), else leave
        the device working while the host goes on to the next step."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(self.inputs, attention_mask=self.mask, one_document_per_row=True)
            loss = masked_cross_entropy(out.logits, self.targets, self.mask) + out.aux_loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        bad = ~torch.isfinite(loss.detach().float() + grad_norm)
        for optimizer in self.optimizers:
            optimizer.found_inf = bad.float()
            optimizer.step()
            del optimizer.found_inf
            optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.detach().float(), grad_norm.float()]).tolist() if read else None


def count_syncs(function, device, steps):
    """Host synchronisations CUDA's sync debug mode reports over `steps` calls (None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught) / steps


def training_rows(report, shapes, device, quick, peak, profile_dir):
    batch, seq = (2, 64) if quick else (32, 512)
    for kind, fields in shapes.items():
        torch.manual_seed(0)
        model = TinyMindForCausalLM(TinyMindConfig(**fields)).to(device).train()
        model.set_moe_dispatch("grouped")  # CUDA's (auto there), on a CPU too: one graph, where per_expert breaks it
        active = model.parameter_counts()[1]
        config = model.config
        flops_per_token = 6 * active + 6 * config.num_hidden_layers * config.hidden_size * seq  # causal attention
        # --quick checks the code: dynamo and autograd's tracing without inductor's code generation (the tests
        # compile the model with inductor elsewhere), a minute less on a CPU. On CUDA one more dense row, an
        # experiment for a step bound by the host's launches: the compiled forward and backward replayed as CUDA
        # graphs (not the MoE's, whose forward updates its load counts in place, which inductor does not graph).
        backend = "aot_eager" if quick else "inductor"
        variants = [("eager", None, ("adamw", "muon")), ("compiled", {"backend": backend}, ("adamw", "muon"))]
        if device.type == "cuda" and kind == "dense":
            variants.append(("compiled as CUDA graphs", {"mode": "reduce-overhead"}, ("adamw",)))
        for how, options, optimizer_names in variants:
            compiled = options is not None
            forward = torch.compile(model, dynamic=False, **options) if compiled else model
            for optimizer_name in optimizer_names:
                check = f"train {kind} {how} {optimizer_name}"

                def measure(forward=forward, optimizer_name=optimizer_name, check=check, compiled=compiled):
                    step = Step(model, forward, optimizer_name, batch, seq, device, compiled)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    started = time.perf_counter()
                    step()  # compiles, the first time
                    first_s = time.perf_counter() - started
                    # Ten steps and a log row's read, as `--log_interval 10`: the host's launches overlap the
                    # device's work; beside it the same step waiting for the device every time.
                    seconds = timed(lambda: [step(read=n == 9) for n in range(10)], device, 1 if quick else 3) / 10
                    tokens_per_s = batch * seq / seconds
                    waiting = timed(lambda: step(read=True), device, 2 if quick else 10)
                    note = (f"reading every step: {batch * seq / waiting:,.0f} tokens/s "
                            f"({waiting / seconds:.2f}x the time)")
                    row = {"check": check, "tokens/s": round(tokens_per_s),
                           "MFU %": round(100 * flops_per_token * tokens_per_s / peak, 1),
                           "syncs/step": count_syncs(step, device, 2 if quick else 5),
                           "peak GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                           if device.type == "cuda" else None,
                           "note": note + (f"; first step (compiling) {first_s:.0f} s" if compiled else "")}
                    if profile_dir and compiled and optimizer_name == "muon":
                        profile(step, device, Path(profile_dir) / f"profile_train_{kind}.txt")
                    return [row]

                report.attempt(check, measure)
        del model, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()


def loss_memory_rows(report, device, quick):
    """Peak memory of the loss, forward and backward, over Qwen3's vocabulary: chunked against one float32 copy."""
    positions = 2 * 64 if quick else 32 * 512
    for name, loss in (("chunked (tinymind)", lambda logits, targets: token_cross_entropy(logits, targets)),
                       ("float32 F.cross_entropy", lambda logits, targets: F.cross_entropy(
                           logits.float(), targets, reduction="none"))):
        check = f"loss over {QWEN3_VOCAB:,} tokens × {positions:,} positions, {name}"

        def measure(loss=loss, check=check):
            logits = torch.randn(positions, QWEN3_VOCAB, device=device, dtype=torch.bfloat16, requires_grad=True)
            targets = torch.randint(0, QWEN3_VOCAB, (positions,), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            loss(logits, targets).mean().backward()
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
            return [{"check": check, "peak GiB": None if peak is None else round(peak, 2),
                     "note": "the logits and their gradient (bf16) included" if peak is not None else "memory: CUDA only"}]

        report.attempt(check, measure)


def decode_rows(report, fields, device, quick, profile_dir):
    new_tokens = 16 if quick else 256
    repeats = 2 if quick else 3
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(**fields)).to(device).eval()
    twin = LlamaForCausalLM._from_config(llama_config(model.config), attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict(), strict=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, twin = model.to(dtype), twin.to(device, dtype).eval()
    twin.generation_config.eos_token_id = None
    for batch in (1, 8):
        prompt = torch.randint(0, model.config.vocab_size, (batch, 32), device=device)
        ours, theirs_rate = [], []  # filled by the first row, read by the engine's

        def generate(prompt=prompt):
            return twin.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)

        def measure(batch=batch, prompt=prompt, generate=generate, ours=ours, theirs_rate=theirs_rate):
            ours.append(fast_generate(model, prompt, new_tokens))
            theirs = generate()
            ours_s = timed(lambda: fast_generate(model, prompt, new_tokens), device, repeats)
            theirs_s = timed(generate, device, repeats)
            theirs_rate.append(batch * new_tokens / theirs_s)
            compiled = fast_generate(model, prompt, new_tokens, compile=True)  # compiles (`3-eval.py --compile`)
            compiled_s = timed(lambda: fast_generate(model, prompt, new_tokens, compile=True), device, repeats)
            if profile_dir and batch == 1:
                profile(lambda: fast_generate(model, prompt, new_tokens), device,
                        Path(profile_dir) / "profile_decode_batch_1.txt", steps=1)
            return [{"check": f"decode batch {batch}, {new_tokens} tokens", "tokens/s": round(batch * new_tokens / ours_s),
                     "note": f"transformers generate {batch * new_tokens / theirs_s:.0f} tokens/s: "
                             f"{theirs_s / ours_s:.2f}x; same tokens: {torch.equal(ours[0], theirs)}; its compiled "
                             f"step {batch * new_tokens / compiled_s:.0f} tokens/s: {theirs_s / compiled_s:.2f}x "
                             f"generate, same tokens: {torch.equal(ours[0], compiled)}"}]

        report.attempt(f"decode batch {batch}, {new_tokens} tokens", measure)
        # As sized here (a slot per request, a cache just long enough), then as `scripts/serve.py` sizes it by
        # default (8 slots, a 2048-token context): the compiled step decodes every slot over the whole cache.
        for slots, context in ((batch, prompt.size(1) + new_tokens), (8, 256 if quick else 2048)):
            check = f"server engine batch {batch}, {new_tokens} tokens, {slots} slots × {context} positions, compiled step"

            def measure(batch=batch, prompt=prompt, slots=slots, context=context, check=check, ours=ours,
                        theirs_rate=theirs_rate):
                graphed, graphed_s, held = engine_run(model, prompt, new_tokens, True, device, repeats, slots, context)
                eager, eager_s, _ = engine_run(model, prompt, new_tokens, False, device, repeats, slots, context)
                same = graphed == eager == ours[0].tolist() if ours else graphed == eager
                rate = batch * new_tokens / graphed_s
                against = f"{rate / theirs_rate[0]:.2f}x transformers generate; " if theirs_rate else ""
                return [{"check": check, "tokens/s": round(rate),
                         "note": f"{'a CUDA graph' if device.type == 'cuda' else 'compiled'}"
                                 f"{'' if held else ' FAILED (its warning says where), so eager'}: {against}the eager "
                                 f"decoder {batch * new_tokens / eager_s:.0f} tokens/s: {eager_s / graphed_s:.2f}x; "
                                 f"same tokens: {same}"}]

            report.attempt(check, measure)


def engine_run(model, prompt, new_tokens, graphs, device, repeats, slots, context):
    """The server's engine (model/engine.py) of `slots` cache rows of `context` positions decoding the prompt's
    rows as concurrent greedy requests: their tokens (prompt + answer, per row), the median seconds, after an
    untimed run that compiles, and whether the engine still decodes through its compiled step."""
    engine = Engine(model, eos_token_id=None, max_batch=slots, context=context, graphs=graphs)

    def run():
        answers = [list(row) for row in prompt.tolist()]
        done = [threading.Event() for _ in answers]
        for row, ids in enumerate(prompt.tolist()):
            def emit(token, reason, row=row):
                answers[row].append(token) if reason is None else done[row].set()
            engine.submit(Request(ids, new_tokens, Sampling(), emit, ignore_eos=True))
        for event in done:
            event.wait()
        return answers

    try:
        return run(), timed(run, device, repeats), engine.graphs
    finally:
        engine.close()  # its thread and cache go before the next row's engine


def pretrain_rows(report, device, quick):
    """`1-pretrain.py --model_type moe --config configs/moe.json` as a user starts it (on CUDA: compiled, batches
    collated by two workers, rows padded to four widths), for a few log intervals over a synthetic corpus of
    documents of varied length: the trainer's own tokens/s from its log, every figure of the rows above in one."""
    check = "1-pretrain.py --model_type moe --config configs/moe.json"

    def measure():
        if importlib.util.find_spec("datasets") is None:
            return [{"check": check, "note": "skipped: the trainer reads its data with `datasets`, not installed"}]
        steps, interval = (4, 2) if quick else (60, 10)
        shape = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
                 "--num_key_value_heads", "2", "--batch_size", "4", "--max_seq_len", "128"] if quick else []
        words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
        choose = random.Random(0)
        with tempfile.TemporaryDirectory() as folder:
            data = Path(folder) / "pretrain.jsonl"
            data.write_text("".join(json.dumps({"text": " ".join(choose.choices(words, k=choose.randint(20, 600)))})
                                    + "\n" for _ in range(steps * 64)))
            command = [sys.executable, str(ROOT / "1-pretrain.py"), "--model_type", "moe", "--config",
                       str(ROOT / "configs" / "moe.json"), *shape, "--data_path", str(data), "--max_steps", str(steps),
                       "--log_interval", str(interval), "--out_dir", folder, "--device", device.type]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                    env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)})
            seconds = time.perf_counter() - started
            if result.returncode:
                raise RuntimeError((result.stderr.strip().splitlines() or ["no output"])[-1])
            with next(Path(folder).rglob("*_log.csv")).open() as log:
                rates = [float(row["tokens_per_s"]) for row in csv.DictReader(log) if row["step"] != "0"]
        return [{"check": f"{check}, {steps} steps", "tokens/s": round(rates[-1]),
                 "note": f"the trainer's log rows, every {interval} steps: {', '.join(f'{r:,.0f}' for r in rates)} "
                         f"real tokens/s (compiles in the first ones); {seconds:.0f} s with start and saves"}]

    report.attempt(check, measure)


def print_table(rows):
    columns = ["check", "tokens/s", "MFU %", "syncs/step", "peak GiB", "note"]
    cells = [[("" if row.get(column) is None else str(row.get(column))) for column in columns] for row in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    report = Report(args.json, args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(device, args.quick)
    shapes = model_shapes(args.quick)
    dense = TinyMindConfig(**shapes["dense"])
    report.add({"check": f"device: {name}", "note": f"torch {torch.__version__}"})
    report.add({"check": "bf16 matmul peak (measured)", "note": f"{peak / 1e12:.1f} TFLOP/s"})
    for check, documents in (("SDPA kernel, training shapes", False), ("SDPA kernel, --pack isolated", True)):
        report.attempt(check, lambda check=check, documents=documents: [{
            "check": check, "note": sdpa_kernel(device, dense, 64 if args.quick else 512, documents)}])
    training_rows(report, shapes, device, args.quick, peak, args.profile_dir)
    loss_memory_rows(report, device, args.quick)
    decode_rows(report, shapes["dense"], device, args.quick, args.profile_dir)
    pretrain_rows(report, device, args.quick)  # last: within --budget_s only if the rows above left time
    report.add({"check": "this check's wall time", "note": f"{time.perf_counter() - report.started:.0f} s"})
    print_table(report.rows)


if __name__ == "__main__":
    main()
