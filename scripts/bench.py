"""Benchmark tinymind against the Hugging Face implementations of the same network, on the same weights.

    python -m scripts.bench                                # small preset, batch 8 x 512, float32, every case
    python -m scripts.bench --dtype bfloat16               # the same under bf16 autocast
    python -m scripts.bench --cases dense,generate --repeats 3
    python -m scripts.bench --peak_mem                     # also the memory of a training step, per batch size
    python -m scripts.bench --cases moe,dispatch --profile # and where each contender's time goes, by operator

Cases (`--cases`, comma-separated; all by default):
    dense         training step: tinymind dense vs transformers' LlamaForCausalLM
    moe           training step: tinymind MoE vs transformers' Qwen2MoeForCausalLM with the weights
                  `convert_hf.py export` writes (same logits; Qwen2-MoE adds a sigmoid gate on its shared
                  expert, a rounding error in time)
    dispatch      MoE training step vs a dense tinymind whose FFN does the same active FLOPs
                  (intermediate_size = (k + n_shared) x expert width): what routing costs; and the same
                  MoE with MiniMind2's training dispatch (activations repeated k times, a boolean mask per
                  expert, a float16 output buffer, written here from its description) on the same weights
    generate      256 new tokens (`--new_tokens`) at batch 1 with the KV cache, greedy, eos ignored:
                  tinymind's `fast_generate` vs transformers' `generate` on LlamaForCausalLM
                  (tinymind through `generate` is shown too, and the weight-read floor: the
                  matrix-vector products alone, every weight matrix a token meets times one vector in
                  the benchmark's dtype, a bound for batch-1 decoding of those weights on this machine)
    generate_moe  the same, tinymind MoE vs Qwen2MoeForCausalLM (floor: the k routed experts only)
    muon          tinymind dense's whole training step with Muon (1-pretrain.py's default: model/muon.py on
                  the blocks' matrices, AdamW on the rest) against the same step with AdamW alone (and with
                  Newton-Schulz in bfloat16, as on a GPU, where a CPU's default is float32)

A training step is forward, masked CE (+ the MoE aux loss), backward, AdamW step, zero_grad. Every
contender the asked-for cases need is timed in this one process, round-robin (A B C A B C ...) after
warm-up, so a neighbour process slowing the machine slows all of them alike; the table gives medians.

Model-FLOPs utilisation (MFU) = model FLOPs per second / the peak this machine reaches on one large
square matmul in the same dtype (measured here). Model FLOPs per trained token are PaLM's
6·N + 12·L·d·T (N active parameters with the tied embedding counted once as the LM head, L layers,
d attention width, T sequence length); per generated token 2·N + 4·L·d·context.

`--peak_mem` runs training steps in fresh processes at two batch sizes and reports the peak memory of
each (CUDA: torch.cuda.max_memory_allocated; CPU: the process's resident-set high-water mark VmHWM
above its RSS before the model was built, i.e. weights, gradients, AdamW state, activations and
allocator slack), then the largest batch a memory budget holds, extrapolated from the two points
(activation memory is linear in the batch; probing the real limit would swap or OOM-kill neighbours).
"""

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM

from model import TinyMindConfig, TinyMindForCausalLM, atomic_write, fast_generate, masked_cross_entropy
from model.convert import llama_config, qwen2_moe_config, to_qwen2_moe
from trainer.flags import MODEL_FLAGS
from trainer.loop import make_optimizers
from trainer.precision import autocast_context

ROOT = Path(__file__).resolve().parent.parent
CASES = ("dense", "moe", "dispatch", "generate", "generate_moe", "muon")
PROMPT_TOKENS = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/small.json",
                        help="JSON preset: its model keys and max_seq_len are used, run keys like batch_size ignored")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, help="tokens per sample (default: the preset's max_seq_len, else 512)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="float32, or autocast to bfloat16/float16 (weights and optimizer stay float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every training contender, and fast_generate's decode step (its compiled "
                             "step, a MoE's with the grouped dispatch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per contender, after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per contender first")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--peak_mem", action="store_true", help="also measure training-step memory (see above)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, run each contender once under torch.profiler and print its top operators")
    parser.add_argument("--mem_budget_gb", type=float,
                        help="memory the largest-batch estimate must fit in (default: this machine's RAM, or GPU)")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens each generation case generates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="output/bench.json")
    args = parser.parse_args(argv)
    args.cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = [case for case in args.cases if case not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {','.join(unknown)} (choose from {','.join(CASES)})")
    config_path = Path(args.config)
    if not config_path.exists() and (ROOT / config_path).exists():
        config_path = ROOT / config_path  # run from outside the repository
    try:
        args.preset = json.loads(config_path.read_text())
    except FileNotFoundError:
        parser.error(f"--config {args.config}: no such file (presets live in configs/)")
    except json.JSONDecodeError as err:
        parser.error(f"--config {args.config}: not valid JSON ({err})")
    args.seq_len = args.seq_len or args.preset.get("max_seq_len", 512)
    args.learning_rate = args.preset.get("learning_rate", 5e-4)
    return args


# ---- the contenders ------------------------------------------------------------------------------


def tinymind_config(args, use_moe, **overrides):
    # A preset's other keys describe a training run and are ignored here.
    fields = {key: args.preset[key] for key in MODEL_FLAGS if key in args.preset}
    return TinyMindConfig(use_moe=use_moe, **{**fields, **overrides})


def llama_twin(model):
    """LlamaForCausalLM with tinymind dense's weights: the same network, Hugging Face's code."""
    twin = LlamaForCausalLM._from_config(llama_config(model.config), attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict(), strict=True)  # tinymind's state-dict layout is Llama's
    return twin


def qwen2_moe_twin(model):
    """Qwen2MoeForCausalLM as `convert_hf.py export` writes tinymind MoE (the same logits), less what would only
    add work here: the all-zero q/k/v biases, an untied copy of the head, and the all-zero shared expert the
    export gives a model that has none."""
    c = model.config
    config = qwen2_moe_config(c)
    config.qkv_bias, config.tie_word_embeddings = False, True
    state = {key: value for key, value in to_qwen2_moe(model.state_dict(), c).items() if not key.endswith(".bias")}
    if not c.n_shared_experts:
        config.shared_expert_intermediate_size = 0
        state = {key: value[:, :0] if ".shared_expert.down_proj" in key else value[:0] if ".shared_expert." in key
                 else value for key, value in state.items()}
    twin = Qwen2MoeForCausalLM._from_config(config, attn_implementation="sdpa")
    twin.load_state_dict(state, strict=True)
    return twin


def flops_per_trained_token(config, active_params, seq_len):
    return 6 * active_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def flops_per_generated_token(config, active_params, context):
    return 2 * active_params + 4 * config.num_hidden_layers * config.hidden_size * context


class TrainingStep:
    """One contender's full training step on a fixed random batch."""

    def __init__(self, name, model, args, flops_per_token, aux_coef=None, optimizer="adamw", ns_dtype=None):
        self.name = name
        self.model = model.to(args.device).train()
        self.optimizers = make_optimizers(self.model, SimpleNamespace(
            optimizer=optimizer, adam_beta1=0.9, adam_beta2=0.95, muon_momentum=0.95, weight_decay=0.1,
            learning_rate=args.learning_rate, device=args.device))
        for muon in self.optimizers[1:]:  # Newton-Schulz's dtype, where one is asked for (BatchedMuon.ns_dtype)
            muon.ns_dtype = ns_dtype
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.autocast = autocast_context(args)
        self.aux_coef = aux_coef  # None: the model returns its aux loss ready to add (tinymind, or none)
        self.tokens = args.batch_size * args.seq_len
        self.flops_per_token = flops_per_token
        generator = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        shape = (args.batch_size, args.seq_len)
        self.input_ids = torch.randint(3, vocab, shape, generator=generator).to(args.device)
        self.targets = torch.randint(3, vocab, shape, generator=generator).to(args.device)
        self.loss_mask = torch.ones(shape, device=args.device)
        self.losses = []

    def run(self):
        with self.autocast:
            if isinstance(self.model, TinyMindForCausalLM):  # as a training batch reaches it: unpadded rows
                out = self.forward(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                   one_document_per_row=True)
                aux = out.aux_loss
            elif self.aux_coef is None:
                out = self.forward(self.input_ids, attention_mask=torch.ones_like(self.input_ids))
                aux = getattr(out, "aux_loss", None)  # Llama has none
            else:
                out = self.forward(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                   output_router_logits=True)
                aux = self.aux_coef * out.aux_loss
            loss = masked_cross_entropy(out.logits, self.targets, self.loss_mask)
            if aux is not None:
                loss = loss + aux
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


class Generation:
    """Greedy generation of `--new_tokens` tokens at batch 1 after a fixed random prompt.

    `fast=True` times tinymind's `fast_generate` (with --compile through its compiled step, unless
    `compile=False`), else Hugging Face's `generate` (any model).
    """

    def __init__(self, name, model, args, flops_per_token, fast=False, compile=True):
        self.name = name
        self.fast = fast
        self.compile = fast and compile and args.compile
        self.model = model.to(args.device).eval()
        if self.compile:
            self.model.set_moe_dispatch("grouped")  # a MoE's step compiles whole only with it
        self.model.generation_config.eos_token_id = None  # always generate exactly new_tokens tokens
        self.new_tokens = args.new_tokens
        self.autocast = autocast_context(args)
        self.tokens = args.new_tokens
        self.flops_per_token = flops_per_token
        generator = torch.Generator().manual_seed(args.seed)
        self.prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator).to(args.device)
        self.output = None

    def run(self):
        with torch.no_grad(), self.autocast:
            if self.fast:
                self.output = fast_generate(self.model, self.prompt, self.new_tokens, compile=self.compile)
            else:
                self.output = self.model.generate(
                    self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=self.new_tokens,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )
        assert self.output.shape[1] == PROMPT_TOKENS + self.new_tokens


def build_contenders(args):
    """Every contender the asked-for cases need, built once (a case may share one with another case)."""
    torch.manual_seed(args.seed)
    contenders = {MatmulPeak.name: MatmulPeak(args)}
    wanted = set(args.cases)

    def add(contender):
        contenders[contender.name] = contender

    def train_flops(model):
        return flops_per_trained_token(model.config, model.parameter_counts()[1], args.seq_len)

    def gen_flops(model):
        return flops_per_generated_token(model.config, model.parameter_counts()[1], PROMPT_TOKENS + args.new_tokens // 2)

    if wanted & {"dense", "generate", "muon"}:
        dense = TinyMindForCausalLM(tinymind_config(args, use_moe=False))
        if wanted & {"dense", "muon"}:
            add(TrainingStep("tinymind dense", dense, args, train_flops(dense)))
        if "dense" in wanted:
            add(TrainingStep("transformers Llama", llama_twin(dense), args, train_flops(dense)))
        if "muon" in wanted:
            add(TrainingStep("tinymind dense, Muon", copy_of(dense), args, train_flops(dense), optimizer="muon"))
            add(TrainingStep("tinymind dense, Muon in bfloat16", copy_of(dense), args, train_flops(dense),
                             optimizer="muon", ns_dtype=torch.bfloat16))  # what a GPU runs; a CPU's default is fp32
        if "generate" in wanted:
            add(Generation("tinymind fast_generate", copy_of(dense), args, gen_flops(dense), fast=True))
            if args.compile:  # the eager decoder beside the compiled one, in the same rounds
                add(Generation("tinymind fast_generate, eager", copy_of(dense), args, gen_flops(dense), fast=True,
                               compile=False))
            add(Generation("tinymind HF generate", copy_of(dense), args, gen_flops(dense)))
            add(Generation("transformers Llama generate", llama_twin(dense), args, gen_flops(dense)))
            add(WeightReadFloor("weight-read floor, dense", dense, args, gen_flops(dense)))
    if wanted & {"moe", "dispatch", "generate_moe"}:
        moe = TinyMindForCausalLM(tinymind_config(args, use_moe=True))
        if wanted & {"moe", "dispatch"}:
            add(TrainingStep("tinymind MoE", moe, args, train_flops(moe)))
        if "moe" in wanted:
            add(TrainingStep("transformers Qwen2-MoE", qwen2_moe_twin(moe), args, train_flops(moe),
                             aux_coef=moe.config.aux_loss_alpha))
        if "dispatch" in wanted:
            c = moe.config
            equal_flops = TinyMindForCausalLM(tinymind_config(
                args, use_moe=False, intermediate_size=(c.num_experts_per_tok + c.n_shared_experts) * c.intermediate_size))
            add(TrainingStep("tinymind dense, MoE-active FFN", equal_flops, args, train_flops(equal_flops)))
            add(TrainingStep("MiniMind2-style MoE dispatch", with_minimind2_dispatch(copy_of(moe)), args,
                             train_flops(moe)))
        if "generate_moe" in wanted:
            add(Generation("tinymind MoE fast_generate", copy_of(moe), args, gen_flops(moe), fast=True))
            add(Generation("transformers Qwen2-MoE generate", qwen2_moe_twin(moe), args, gen_flops(moe)))
            add(WeightReadFloor("weight-read floor, MoE", moe, args, gen_flops(moe)))
    return contenders


def with_minimind2_dispatch(model):
    """`model` with every MoE layer dispatching as MiniMind2's training code does: each token's activations
    repeated k times, each expert run on the rows a boolean mask selects, its outputs written into a float16
    buffer, then the k rows of a token weighted and summed; shared experts and the aux loss as tinymind's."""
    def forward(self, x, token_mask):
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat).float().softmax(dim=-1)
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        repeated = flat.repeat_interleave(self.top_k, dim=0)
        assigned = experts.reshape(-1)
        out = torch.empty_like(repeated, dtype=torch.float16)
        for index, expert in enumerate(self.experts):
            chosen = assigned == index
            out[chosen] = expert(repeated[chosen]).to(out.dtype)
        out = (out.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
        for shared in self.shared_experts:
            out = out + shared(flat)
        aux = self._balance_loss(scores, experts, token_mask, batch, seq) if self.training else scores.new_zeros(())
        return out.view(batch, seq, hidden), aux

    for layer in model.moe_layers():
        layer.forward = forward.__get__(layer)
    return model


def copy_of(model):
    twin = TinyMindForCausalLM(model.config)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


# ---- measuring -----------------------------------------------------------------------------------


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(contenders, args):
    """Seconds per run of each contender: `warmup` untimed rounds, then `repeats` timed ones, A B C A B C ...;
    and the seconds of each one's first run (compiling included, with --compile)."""
    seconds, first = {name: [] for name in contenders}, {}
    rounds = args.warmup + args.repeats
    with tqdm(total=rounds * len(contenders), desc="timing", dynamic_ncols=True) as bar:
        for round_index in range(rounds):
            for name, contender in contenders.items():
                bar.set_postfix_str(name)
                synchronize(args.device)
                started = time.perf_counter()
                contender.run()
                synchronize(args.device)
                first.setdefault(name, time.perf_counter() - started)
                if round_index >= args.warmup:
                    seconds[name].append(time.perf_counter() - started)
                bar.update()
    return seconds, first


class MatmulPeak:
    """One large square matmul in the benchmark's compute dtype; its best time gives the machine's peak FLOP/s.

    Timed in the same rounds as the contenders, so the peak is taken in the same conditions.
    """

    name = "matmul peak"

    def __init__(self, args):
        size = 8192 if torch.device(args.device).type == "cuda" else 2048
        dtype = torch.float32 if args.dtype == "float32" else getattr(torch, args.dtype)
        self.a = torch.randn(size, size, device=args.device).to(dtype)
        self.b = torch.randn(size, size, device=args.device).to(dtype)
        self.flops = 2 * size**3

    def run(self):
        self.a @ self.b


class WeightReadFloor:
    """Decoding's memory-bound core alone: each weight matrix one token meets (the first k routed experts
    standing in for the chosen ones) applied to one vector with F.linear, as the models do, in the compute
    dtype, for `tokens` tokens. Packing matrices together saves only the few microseconds per call."""

    def __init__(self, name, model, args, flops_per_token, tokens=32):
        self.name = name
        self.tokens = tokens
        self.flops_per_token = flops_per_token
        dtype = torch.float32 if args.dtype == "float32" else getattr(torch, args.dtype)
        k = model.config.num_experts_per_tok
        chosen = [w for key, w in model.named_parameters()
                  if w.dim() == 2 and "embed_tokens" not in key
                  and not (".experts." in key and int(key.split(".experts.")[1].split(".")[0]) >= k)]
        if model.config.tie_word_embeddings:  # the head is the embedding, which the filter above left out
            chosen.append(model.get_output_embeddings().weight)
        self.matrices = [w.detach().to(args.device, dtype) for w in chosen]
        self.vectors = {w.shape[1]: torch.randn(1, w.shape[1], device=args.device, dtype=dtype) for w in chosen}

    def run(self):
        with torch.no_grad():
            for _ in range(self.tokens):
                for w in self.matrices:
                    torch.nn.functional.linear(self.vectors[w.shape[1]], w)


def print_profiles(contenders, args, top=8):
    """Self time per operator of one run of each contender: where a gap between two of them comes from."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    # On a GPU the host only launches kernels: the time that matters is the device's.
    field, where = ("self_device_time_total", "GPU") if on_gpu else ("self_cpu_time_total", "CPU")
    for name, contender in contenders.items():
        if name == MatmulPeak.name:
            continue
        with profile(activities=activities) as profiler:
            contender.run()
            synchronize(args.device)
        events = sorted(profiler.key_averages(), key=lambda event: getattr(event, field), reverse=True)
        total = sum(getattr(event, field) for event in events)
        shares = ", ".join(f"{event.key} {100 * getattr(event, field) / total:.1f}%" for event in events[:top])
        print(f"\nprofile of {name}: {total / 1e6:.2f} s of {where} self time; {shares}")


# ---- memory --------------------------------------------------------------------------------------


def proc_status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def training_step_memory(args, use_moe, batch_size, results):
    """Runs in a fresh process: peak bytes of two training steps (the second has AdamW state) at `batch_size`."""
    args.batch_size = batch_size
    device_is_cuda = torch.device(args.device).type == "cuda"
    if not device_is_cuda:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        baseline = proc_status_bytes("VmRSS")
    torch.manual_seed(args.seed)
    model = TinyMindForCausalLM(tinymind_config(args, use_moe=use_moe))
    step = TrainingStep("probe", model, args, 0)
    step.run()
    step.run()
    if device_is_cuda:
        synchronize(args.device)
        results.put(torch.cuda.max_memory_allocated())
    else:
        results.put(proc_status_bytes("VmHWM") - baseline)


def memory_report(args):
    budget = args.mem_budget_gb * 2**30 if args.mem_budget_gb else (
        torch.cuda.get_device_properties(args.device).total_memory if torch.device(args.device).type == "cuda"
        else proc_meminfo_total())
    batches = sorted({max(1, args.batch_size // 2), args.batch_size})
    if len(batches) == 1:
        batches.append(2)
    context = multiprocessing.get_context("spawn")
    report = {"budget_bytes": budget, "method": "cuda max_memory_allocated" if torch.device(args.device).type == "cuda"
              else "VmHWM - VmRSS before the model, fresh process"}
    probes = [(kind, batch) for kind in ("dense", "moe") for batch in batches]
    for kind, batch in tqdm(probes, desc="peak memory", dynamic_ncols=True):
        results = context.Queue()
        process = context.Process(target=training_step_memory, args=(args, kind == "moe", batch, results))
        process.start()
        peak = results.get()
        process.join()
        report.setdefault(kind, {"peak_bytes": {}})["peak_bytes"][batch] = peak
    for kind in ("dense", "moe"):
        (b1, m1), (b2, m2) = sorted(report[kind]["peak_bytes"].items())
        per_sample = (m2 - m1) / (b2 - b1)
        fixed = m1 - per_sample * b1
        report[kind].update(per_sample_bytes=per_sample, fixed_bytes=fixed,
                            max_batch=int((budget - fixed) // per_sample) if per_sample > 0 else None)
    return report


def proc_meminfo_total():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


# ---- the report ----------------------------------------------------------------------------------

# case: (contender, reference, how the ratio reads, target in float32, target in bf16/fp16)
CASE_PAIRS = {
    "dense": ("tinymind dense", "transformers Llama", "speed-up", 1.0, 1.2),
    "moe": ("tinymind MoE", "transformers Qwen2-MoE", "speed-up", 1.0, 1.2),
    "dispatch": ("tinymind MoE", "tinymind dense, MoE-active FFN", "time ratio", 1.10, 1.10),
    "generate": ("tinymind fast_generate", "transformers Llama generate", "speed-up", 2.0, 2.0),
    "generate_moe": ("tinymind MoE fast_generate", "transformers Qwen2-MoE generate", "speed-up", 2.0, 2.0),
    "muon": ("tinymind dense, Muon", "tinymind dense", "time ratio", 1.10, 1.10),
}


# The bound a decoding case's contender is measured against.
FLOORS = {"generate": "weight-read floor, dense", "generate_moe": "weight-read floor, MoE"}

# Rows printed under a case for context, without a ratio or target of their own.
CASE_EXTRA_ROWS = {"dispatch": ("MiniMind2-style MoE dispatch",), "muon": ("tinymind dense, Muon in bfloat16",),
                   "generate": ("tinymind fast_generate, eager", "tinymind HF generate", "weight-read floor, dense"),
                   "generate_moe": ("weight-read floor, MoE",)}


def summarise(args, contenders, seconds, first):
    peak_flops = contenders[MatmulPeak.name].flops / min(seconds[MatmulPeak.name])
    rows = {}
    for name, contender in contenders.items():
        if name == MatmulPeak.name:
            continue
        median = statistics.median(seconds[name])
        tokens_per_s = contender.tokens / median
        rows[name] = {"seconds": seconds[name], "median_s": median, "tokens_per_s": tokens_per_s,
                      "first_run_s": first[name],
                      "mfu": contender.flops_per_token * tokens_per_s / peak_flops,
                      "first_loss": getattr(contender, "losses", [None])[0]}
    cases = {}
    for case in args.cases:
        mine, reference, reading, target32, target16 = CASE_PAIRS[case]
        target = target32 if args.dtype == "float32" else target16
        if reading == "speed-up":
            ratio = rows[mine]["tokens_per_s"] / rows[reference]["tokens_per_s"]
            met = ratio >= target
        else:
            ratio = rows[mine]["median_s"] / rows[reference]["median_s"]
            met = ratio <= target
        cases[case] = {"contender": mine, "reference": reference, "ratio": ratio, "reading": reading,
                       "target": target, "met": met}
    if "generate" in cases:
        # Same weights, same greedy decoding: the two must agree token for token (float ties aside).
        cases["generate"]["same_tokens"] = torch.equal(
            contenders["tinymind fast_generate"].output, contenders["transformers Llama generate"].output)
    return rows, cases, peak_flops


def print_table(args, rows, cases, peak_flops, memory):
    print(f"\n{args.config}, batch {args.batch_size} x {args.seq_len}, {args.dtype}"
          f"{', compiled' if args.compile else ''}, {args.device} ({torch.get_num_threads()} threads), "
          f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s, medians of {args.repeats}")
    header = f"{'case':<13} {'contender':<34} {'tokens/s':>9} {'MFU':>6} {'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    for case, result in cases.items():
        names = [result["contender"], *(name for name in CASE_EXTRA_ROWS.get(case, ()) if name in rows),
                 result["reference"]]
        for name in names:
            row = rows[name]
            is_mine = name == result["contender"]
            ratio = f"{result['ratio']:.2f}x" if is_mine else ""
            if is_mine:
                sign = ">=" if result["reading"] == "speed-up" else "<="
                target = f"{result['reading']} {sign} {result['target']:.2f}: {'met' if result['met'] else 'MISSED'}"
            else:
                target = ""
            print(f"{case if is_mine else '':<13} {name:<34} {row['tokens_per_s']:>9.1f} "
                  f"{100 * row['mfu']:>5.1f}% {ratio:>8}  {target}")
        if case == "dense":  # same weights, same batch: the same loss (Qwen2-MoE's aux loss is another formula)
            print(f"{'':<13} (first-step loss: {rows[result['contender']]['first_loss']:.4f} vs "
                  f"{rows[result['reference']]['first_loss']:.4f})")
        if "same_tokens" in result:
            print(f"{'':<13} (tinymind and Llama generate the same {args.new_tokens} tokens: {result['same_tokens']})")
        floor = FLOORS.get(case)
        if floor in rows:
            for name in (result["contender"], f"{result['contender']}, eager"):
                if name in rows:
                    share = rows[name]["tokens_per_s"] / rows[floor]["tokens_per_s"]
                    print(f"{'':<13} ({name}: {100 * share:.0f}% of the {floor})")
    print("MFU = model FLOP/s (6N + 12·L·d·T per trained token, 2N + 4·L·d·context per generated one) "
          "/ matmul peak")
    if args.compile:
        print("first run (compiling included, where compiled): " + ", ".join(
            f"{name} {rows[name]['first_run_s']:.1f} s" for name in rows if "floor" not in name))
    if memory:
        print(f"\npeak memory of a training step ({memory['method']}), "
              f"largest batch for {memory['budget_bytes'] / 2**30:.1f} GiB:")
        for kind in ("dense", "moe"):
            points = ", ".join(f"batch {b}: {m / 2**30:.2f} GiB" for b, m in memory[kind]["peak_bytes"].items())
            print(f"  {kind:<6} {points}; {memory[kind]['per_sample_bytes'] / 2**20:.0f} MiB per sample "
                  f"-> max batch {memory[kind]['max_batch']}")


def main(argv=None):
    args = parse_args(argv)
    contenders = build_contenders(args)
    seconds, first = time_round_robin(contenders, args)
    rows, cases, peak_flops = summarise(args, contenders, seconds, first)
    memory = memory_report(args) if args.peak_mem else None
    print_table(args, rows, cases, peak_flops, memory)
    if args.profile:
        print_profiles(contenders, args)
    settings = {key: value for key, value in vars(args).items() if key != "preset"}
    report = {
        "command": " ".join(["python", "-m", "scripts.bench", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings, "preset": args.preset,
        "machine": {"device": args.device, "platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "matmul_peak_flops": peak_flops},
        "contenders": rows, "cases": cases, "memory": memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
