"""The training loop, read top to bottom: data order → micro-batches → objective → optimizer step → log → save.

One optimizer step takes `accumulation_steps` micro-batches per process. The objective
(trainer/objectives.py) turns each into its share of the step's loss, normalised over the
whole step, so the accumulated gradient is that of one large batch. The loop does the rest
for every stage alike: autocast, gradient sync, clipping, the non-finite step skip, the
learning-rate schedule, the progress bar and CSV, and the checkpoints `--resume` continues
from bit-exactly (`state_dict` / `load_state_dict`, in the run folder of trainer/run_folder.py).
"""

import contextlib
import ctypes
import math
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset import LENGTH_GROUP_STEPS, epoch_order
from model import atomic_write, save_weights
from model.muon import POLAR_EXPRESS, QUINTIC, BatchedMuon, is_hidden_matrix

from . import distributed
from .distributed import say
from .errors import UserError
from .metrics import CsvLog, ExpertLoadWatch, held_out_column, log_columns, peak_memory_bytes
from .tracking import clear_local_output, open_tracker
from .objectives import Step
from .precision import autocast_context, grad_scaler
from .run_folder import RESUME_FLAGS, check_resume_flags, read_resume_state, rng_state, set_rng_state

MAX_BAD_STEPS = 5


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # samples of this epoch's order already consumed
    tokens: int = 0  # real (non-padding) input tokens seen
    seconds: float = 0.0  # training wall time, loading batches included, evaluation and saves left out
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient


def lr_at(step, total_steps, warmup_steps, peak, schedule="cosine", decay_fraction=0.2, final_fraction=0.1):
    """Linear warmup to `peak`, then either cosine decay to `final_fraction` of the peak at the last step, or
    warmup-stable-decay: `peak` until the last `decay_fraction` of the steps, then linear decay to that end.
    The warmup must end before the last step (`plan_steps` refuses one as long as the run) for the rate to reach
    that end."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    final = peak * final_fraction
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        left = (total_steps - 1 - step) / decay_steps  # 1 where the decay starts, 0 at the last step
        return final + (peak - final) * min(max(left, 0.0), 1.0)
    span = total_steps - 1 - warmup_steps  # from the first step after warmup to the last; 0: that one is the last
    progress = (step - warmup_steps) / span if span > 0 else 1.0  # 0 after warmup, 1 at the last step
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def leave_stop_signals_to_the_trainer(worker_id):
    """In a DataLoader worker: out of the terminal's process group, which Ctrl-C (or a SIGTERM to the group) reaches,
    and with the default handlers back. A worker inherits the trainer's, which would say it saves (once per worker) and,
    at a second Ctrl-C, kill the worker under the loader; the trainer stops its workers itself (a SIGTERM each)."""
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def plan_steps(args, samples, world_size):
    """(total steps, warmup steps): --max_steps, else --epochs passes over the samples the processes take (cut to a
    multiple of `world_size`, as `step_batches` cuts them, so an epoch ends where the plan says); the warmup is
    --warmup_steps, else 2% of the steps (at least 1). Refused in one line: fewer samples than processes (none
    would get any: the run would wait forever) and a given warmup as long as the run (it would end at the peak)."""
    taken = samples - samples % world_size
    if not taken:
        raise UserError(f"the training data has {samples} samples, fewer than the {world_size} processes: each "
                        "needs one at least; add data or run fewer processes")
    samples_per_step = args.batch_size * args.accumulation_steps * world_size
    total = args.max_steps or args.epochs * math.ceil(taken / samples_per_step)
    if args.warmup_steps is not None and args.warmup_steps >= total:
        raise UserError(f"--warmup_steps {args.warmup_steps}: the run has {total} steps; warm up over fewer, so the "
                        "rate reaches its peak and then its final rate")
    return total, args.warmup_steps if args.warmup_steps is not None else max(1, total // 50)


def make_optimizers(model, args):
    """AdamW over everything, or (`--optimizer muon`) Muon (model/muon.py: torch.optim.Muon's update, batched by
    shape) over the hidden matrices and AdamW over the rest.
    Weight decay on matrices only: decaying norms' gains and the like only hurts. Muon's update is scaled to
    AdamW's RMS (`match_rms_adamw`), so one --learning_rate serves both. --embedding_lr and --head_lr give the
    embedding tables and an untied head peak rates of their own (nanochat's per-group rates), in groups of their
    own after the two above. No group is left empty: a resume state's optimizer state is matched to this run's
    groups by parameter name (torch.distributed.checkpoint), which refuses empty groups, so a run resumed with
    either rate newly given (or dropped) continues every weight's state. Every group's rate follows the one
    schedule, scaled to its peak."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizers = []
    if args.optimizer == "muon":
        hidden = [p for name, p in named if is_hidden_matrix(name, p)]
        optimizers.append(BatchedMuon(hidden, lr=args.learning_rate, weight_decay=args.weight_decay,
                                      momentum=args.muon_momentum, adjust_lr_fn="match_rms_adamw",
                                      row_beta2=0.95 if getattr(args, "normuon", False) else 0.0,
                                      ns_coefficients=POLAR_EXPRESS if getattr(args, "polar_express", False)
                                      else QUINTIC,
                                      compile=getattr(args, "compile", False)))
        named = [(name, p) for name, p in named if not is_hidden_matrix(name, p)]
    own_rates = [("embedding_lr", "the embedding", is_embedding),
                 ("head_lr", "an untied LM head (pass --tie_word_embeddings false)",
                  lambda name: name.endswith("lm_head.weight"))]
    groups = []
    for flag, what, match in own_rates:
        if getattr(args, flag, None) is not None:
            params = [p for name, p in named if match(name)]
            if not params:
                raise UserError(f"--{flag}: this run trains no weights of {what}")
            groups.append({"params": params, "lr": getattr(args, flag)})
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [p for _, p in named if id(p) not in grouped]
    groups = [group for group in [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        *groups,
    ] if group["params"]]
    if not groups:  # Muon takes every weight trained (LoRA's adapters)
        return optimizers
    # Fused: one kernel for all the tensors, on a CPU too (where it is several times faster than the foreach
    # default), and it skips a step on the device (`found_inf`), which the non-fused implementations cannot.
    adamw = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.weight_decay, fused=True)
    return [adamw, *optimizers]


def is_embedding(name):
    """A table of per-token rows (the token embedding, nanochat's value embeddings): --embedding_lr's."""
    return name.endswith("embed_tokens.weight") or ".value_embeds." in name


def write_model_weights(model, state, paths):
    """The weights later stages read: the model's state dict and its config beside it."""
    save_weights(state, model.config, paths.weights)


def width_buckets(max_seq_len, count=4):
    """The batch widths a compiled run pads to: `count` steps up to the longest input (`max_seq_len - 1`), each
    rounded up to a multiple of 8, so a run compiles at most `count` shapes however its batches' lengths vary."""
    longest = max_seq_len - 1
    return sorted({min(longest, 8 * math.ceil(longest * k / count / 8)) for k in range(1, count + 1)})


def bucketed(collate, widths, samples):
    """`collate(samples)` padded on the right to the smallest of `widths` that holds it (GRPO's prompts stay as
    they are: the sequences it trains on are made by its sampling)."""
    batch = collate(samples)
    if not hasattr(batch, "padded_to"):
        return batch
    return batch.padded_to(next(width for width in widths if width >= batch.width))


class CompiledOrEager:
    """`torch.compile(module)` with static shapes; if compiling fails, one warning and the module itself from then on."""

    def __init__(self, module):
        self.module, self.compiled = module, torch.compile(module, dynamic=False)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                say(f"warning: torch.compile failed ({type(err).__name__}: {reason}); training goes on without it",
                    err=True)
                self.compiled = None
        return self.module(*args, **kwargs)


def host_to_device(values, device):
    """Host numbers as a float32 tensor on `device`, copied without waiting for the device (from pinned memory)."""
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def keep_freed_memory():
    """With glibc: memory freed by a step kept for the next one instead of handed back to the kernel. glibc serves
    every allocation over 32 MB by a mapping of its own and unmaps it when freed, so a CPU step faulted its
    logits-sized buffers in page by page every time (16 x 256 x 6,400 floats: about 40 ms before anything is
    computed in them); from the heap they are reused. A default step at bench_learning's shape took 0.47 s instead
    of 0.58 (24-step runs, two of each, interleaved). What a run has used stays with its process until it ends.
    Elsewhere (no glibc) nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters
    libc.mallopt(m_mmap_max, 0)  # no allocation served by a mapping of its own
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # free memory at the heap's top kept, up to 2 GB


class Trainer:
    def __init__(self, model, dataset, objective, args, paths, write_weights=None, val=None, tokenizer=None,
                 same_run_flags=()):
        """`write_weights(model, state_dict, paths)` writes what later stages read (default: `write_model_weights`);
        `tokenizer` scores `--eval_tasks`; `same_run_flags`, the stage's own flags a resumed run must keep."""
        self.same_run_flags = tuple(same_run_flags)
        self.args, self.dataset, self.objective, self.paths, self.val = args, dataset, objective, paths, val
        self.write_weights = write_weights or write_model_weights
        self.device = torch.device(args.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.raw_model = model.to(self.device)
        self.raw_model.set_moe_dispatch(args.moe_dispatch)
        if args.grad_checkpointing:
            self.raw_model.gradient_checkpointing_enable()
        self.model = distributed.wrap(self.raw_model, args)
        # Only the training forward is compiled; state dicts and DDP's no_sync keep using the module itself.
        self.forward = CompiledOrEager(self.model) if args.compile else self.model
        self.widths = width_buckets(args.max_seq_len) if args.compile else None
        for module in objective.frozen:
            module.to(self.device).eval().requires_grad_(False)
        self.optimizers = make_optimizers(self.raw_model, args)
        # Each group's peak rate, from the flags: a resume state's rates do not override them.
        self.peak_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in self.optimizers]
        self.scaler = grad_scaler(args)
        self.world_size = distributed.world_size()
        self.samples_per_step = args.batch_size * args.accumulation_steps * self.world_size
        self.total_steps, self.warmup_steps = plan_steps(args, len(dataset), self.world_size)
        self.expert_loads = ExpertLoadWatch(self.raw_model.moe_layers())
        self.tokenizer, self.eval_tasks = tokenizer, []
        if args.eval_tasks:  # checked now, not at the first evaluation: an unknown name is one line before training
            from .benchmarks import resolve_tasks

            _, self.eval_tasks = resolve_tasks(args.eval_tasks, flag="--eval_tasks")
        self.log = CsvLog(paths.log, log_columns(objective, self.expert_loads, val is not None, self.eval_tasks))
        self.run_id, self.tracker = uuid.uuid4().hex[:12], None  # the id stays the run's across --resume
        self.progress = Progress()
        # Non-finite steps are skipped on the device and counted there (skipped since the last read, the current
        # run of them, the longest run since the last read); the host reads the counts with a log row's figures.
        self.skips = torch.zeros(3, device=self.device)
        self.unread = None  # the figures of the steps since the last read, on the device (see read_steps)
        self.read_at, self.stats, self.agreed = 0, {}, None  # the last read: its step, log figures, torchrun's
        self.stop = distributed.StopSignals()

    def train(self):
        if self.args.resume:
            self.resume()
        elif distributed.is_main():  # a fresh run's log and tracker events start empty
            self.log.path.unlink(missing_ok=True)
            clear_local_output(self.paths.dir)
        if distributed.is_main():
            config = {key: value for key, value in vars(self.args).items() if isinstance(value, (str, int, float, bool))}
            self.tracker = open_tracker(self.args.report_to, self.paths.dir, self.paths.name, self.run_id, config,
                                        self.progress.step)
        try:
            return self.train_steps()
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def train_steps(self):
        evaluates = self.val is not None or self.eval_tasks
        if not self.args.resume and evaluates:  # a resumed run's "before" was evaluated by the run it continues
            self.write_log({}, 0.0, self.evaluate("before"))
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc=self.paths.name, dynamic_ncols=True,
                   disable=not distributed.is_main())
        started, first_step, first_seconds = time.perf_counter(), self.progress.step, self.progress.seconds
        interval_start, interval_tokens = started, 0
        evaluate_every = self.args.eval_interval or self.total_steps
        since = time.perf_counter()
        with bar, self.stop as stop:
            while self.progress.step < self.total_steps:
                for micro_batches in self.step_batches():
                    tokens_before = self.progress.tokens
                    self.optimizer_step(micro_batches)
                    self.progress.seconds += time.perf_counter() - since  # loading the batch included
                    interval_tokens += self.progress.tokens - tokens_before
                    step = self.progress.step
                    held_out = {}
                    if evaluates and (step % evaluate_every == 0 or step == self.total_steps):
                        evaluation_started = time.perf_counter()
                        held_out = self.evaluate("after" if step == self.total_steps else f"at step {step} of")
                        interval_start += time.perf_counter() - evaluation_started  # tokens/s counts training only
                    if step % self.args.log_interval == 0 or step == self.total_steps or held_out:
                        stats = self.read_steps()
                        tokens_per_s = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
                        self.write_log(stats, tokens_per_s, held_out)
                        bar.set_postfix({name: f"{value:.3g}" for name, value in stats.items()} |
                                        {"tok_s": f"{tokens_per_s:.0f}"})
                        interval_start, interval_tokens = time.perf_counter(), 0
                    bar.update(1)
                    if step % self.args.save_interval == 0 and step < self.total_steps:
                        self.save()
                    since = time.perf_counter()  # evaluation and saving are not training time
                    if stop.requested():
                        self.save()
                        bar.close()
                        say(f"stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint saved in "
                            f"{self.paths.dir}. Resume with the same command plus --resume", err=True)
                        raise SystemExit(128 + stop.signal)
                    if step >= self.total_steps:
                        break
        self.save()
        steps, seconds = self.progress.step - first_step, self.progress.seconds - first_seconds
        say(f"trained {steps} steps in {seconds:.1f} s ({seconds / max(steps, 1):.3f} s/step; "
            f"{time.perf_counter() - started:.1f} s with evaluation and saves); "
            f"peak memory {peak_memory_bytes(self.device) / 2**30:.2f} GiB")
        return self.progress

    def step_batches(self):
        """This epoch's remaining micro-batches, grouped into optimizer steps; advances the epoch at its end.

        Every process takes every world_size-th sample of one global order (cut to a multiple of
        world_size so all take the same number of steps), so N processes with batch b see the
        samples one process with batch N·b would.
        """
        order = epoch_order(self.dataset.lengths, self.args.seed, self.progress.epoch, self.samples_per_step)
        remaining = order[self.progress.position:]
        remaining = remaining[: len(remaining) - len(remaining) % self.world_size]
        loader = DataLoader(
            Subset(self.dataset, remaining[distributed.rank()::self.world_size]),
            batch_size=self.args.batch_size,
            collate_fn=self.dataset.collate if self.widths is None else partial(bucketed, self.dataset.collate, self.widths),
            num_workers=self.args.num_workers,
            # Its own generator: seeding workers must not draw from the global RNG a resumed run restores.
            generator=torch.Generator().manual_seed(self.args.seed),
            pin_memory=self.device.type == "cuda",
            worker_init_fn=leave_stop_signals_to_the_trainer,
        )
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.args.accumulation_steps:
                yield group
                group = []
        if group:
            yield group
        self.progress.epoch += 1
        self.progress.position = 0

    def optimizer_step(self, micro_batches):
        """One optimizer step over the micro-batches, without waiting for the device: the token counts come from the
        host-side batches, the normaliser of the loss stays a device tensor under torchrun, a non-finite loss or
        gradient skips the update on the device, and the step's figures stay there until `read_steps` (a log row,
        a save). Under torchrun the processes agree on their tokens and stop signals each step, in one all-reduce
        read back with the figures: the step's one wait."""
        args, model, objective = self.args, self.model, self.objective
        def scheduled(peak):
            return lr_at(self.progress.step, self.total_steps, self.warmup_steps, peak, args.schedule,
                         args.decay_fraction, args.final_lr_fraction)

        lr = scheduled(args.learning_rate)
        for optimizer, peaks in zip(self.optimizers, self.peak_lrs):
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = scheduled(peak)
        model.train()
        samples = sum(len(batch) for batch in micro_batches) * self.world_size
        micro_batches = objective.prepare(self.raw_model, micro_batches)
        units = sum(objective.units(b) for b in micro_batches)
        if self.world_size > 1:  # the objectives divide by it as a tensor: no process reads it back
            units = distributed.all_reduce_sum(host_to_device([units], self.device))[0]
        step = Step(units, len(micro_batches), self.world_size)
        totals = torch.zeros(1 + len(objective.metrics), device=self.device)  # loss, metrics...
        tokens = 0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with autocast_context(args), self.gradient_sync(last):
                result = objective(self.forward, batch.to(self.device), step)
                # DDP and FSDP average gradients over processes; each share is of the global step, so
                # scaling by world_size turns that average back into the sum.
                self.scaler.scale(result.loss * self.world_size).backward()
            totals += torch.stack([result.loss.detach().float(), *(result.metrics[name].float()
                                                                   for name in objective.metrics)])
            tokens += result.tokens
        loads = self.expert_loads.take_counts(self.device)
        agreed = totals.new_zeros(0)  # under torchrun: the step's tokens and stop signals over every process
        if self.world_size > 1:  # one all-reduce for all the processes must agree on
            shared = torch.cat([totals, host_to_device([tokens, self.stop.local()], self.device), loads.flatten()])
            totals, agreed, flat_loads = distributed.all_reduce_sum(shared).split([len(totals), 2, loads.numel()])
            loads = flat_loads.view(loads.shape)
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        grad_norm = distributed.whole(grad_norm).detach().float().reshape(1)
        finite_loss, finite_gradients = torch.isfinite(totals[0]), torch.isfinite(grad_norm[0])
        # float16's GradScaler skips inf/NaN gradients itself and lowers its scale: that is not divergence, unless
        # the loss was not finite either.
        bad = ~(finite_loss | finite_gradients) if self.scaler.is_enabled() else ~(finite_loss & finite_gradients)
        for optimizer in self.optimizers:
            if not self.scaler.is_enabled():
                optimizer.found_inf = bad.float()  # GradScaler's protocol: the optimizer skips the step on the device
            self.scaler.step(optimizer)
            optimizer.__dict__.pop("found_inf", None)
        self.scaler.update()
        run = (self.skips[1] + 1) * bad  # the current run of skipped steps, 0 after a good one
        self.skips = torch.stack([self.skips[0] + bad, run, torch.maximum(self.skips[2], run)])
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.expert_loads.layers:
            self.expert_loads.observe(loads / loads.sum(dim=1, keepdim=True).clamp(min=1))
            for layer, counts in zip(self.expert_loads.layers, loads):  # every process: the same, reduced counts
                # no counts, no move: a skipped step changes nothing (float16's scaler skips every step whose
                # gradients overflowed, counted as divergence or not)
                layer.update_bias(counts * (finite_loss & finite_gradients))
        self.progress.step += 1
        self.progress.position += samples
        self.unread = torch.cat([totals, grad_norm, agreed]), lr
        if self.world_size > 1:
            self.read_steps()
            tokens, stop = self.agreed
            self.stop.agree(stop)
        else:
            self.stop.agree(self.stop.local())
        self.progress.tokens += int(tokens)

    def read_steps(self):
        """Wait for the device: the last step's figures for its log row (loss, metrics, lr, gradient norm; also
        kept in `stats`, and under torchrun the processes' tokens and stop signals in `agreed`) and the skipped
        steps since the last read, said, counted in the progress and, after MAX_BAD_STEPS in a row, an error
        that stops the run (its last save kept)."""
        if self.unread is None:
            return self.stats
        (figures, lr), count = self.unread, len(self.objective.metrics) + 1
        read = torch.cat([figures, self.skips]).tolist()
        self.skips = torch.stack([self.skips.new_zeros(()), self.skips[1], self.skips.new_zeros(())])
        self.unread, first, self.read_at = None, self.read_at + 1, self.progress.step
        loss, grad_norm, (skipped, _, longest) = read[0], read[count], read[-3:]
        if skipped:
            self.progress.skipped_steps += int(skipped)
            where = (f"step {first}: non-finite loss {loss} or gradient norm {grad_norm}" if first == self.read_at
                     else f"steps {first}-{self.read_at}: non-finite loss or gradient norm")
            say(f"{where}; update{'s' if skipped > 1 else ''} skipped ({self.progress.skipped_steps} so far)", err=True)
        if longest >= MAX_BAD_STEPS:
            raise UserError(
                f"{MAX_BAD_STEPS} non-finite steps in a row by step {self.read_at}: training diverged. "
                f"The last good checkpoint in {self.paths.dir} is kept; lower --learning_rate or use --dtype float32"
            )
        self.stats = {"loss": loss, **dict(zip(self.objective.metrics, read[1:count])), "lr": lr,
                      "grad_norm": grad_norm}
        self.agreed = read[count + 1:-3] or None
        return self.stats

    def gradient_sync(self, last_micro_batch):
        """DDP all-reduces (FSDP reduce-scatters) gradients on every backward; skipping it until the last
        micro-batch saves the traffic."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_batch:
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def evaluate(self, when):
        """The objective's held-out figures on the validation data and the accuracy of --eval_tasks (every process
        computes them, FSDP needs all), said ("held-out perplexity before sft: ...") and returned as val_* log
        columns."""
        stage = self.paths.name.split("_")[0]
        # The bare module: evaluation needs no gradient sync, and DDP's wrapper hides the model's config.
        scores = self.objective.evaluate(self.raw_model, self.val, self.args) if self.val is not None else {}
        if self.eval_tasks:
            from .benchmarks import task_accuracies  # lm-eval loads only for this

            was_training = self.raw_model.training
            scores |= task_accuracies(self.raw_model, self.tokenizer, self.eval_tasks, self.args)
            self.raw_model.train(was_training)
        for name, value in scores.items():
            say(f"held-out {name} {when} {stage}: {value:.2f}" if name.endswith("perplexity") else
                f"held-out {name} {when} {stage}: {value:.3f}")
        return {held_out_column(name): value for name, value in scores.items()}

    def write_log(self, stats, tokens_per_s, held_out=None):
        if not distributed.is_main():
            return
        row = {"step": self.progress.step, "tokens": self.progress.tokens, "seconds": round(self.progress.seconds, 3),
               "tokens_per_s": round(tokens_per_s, 1),
               **{key: round(value, 6) for key, value in {**stats, **(held_out or {})}.items()}}
        shares, warnings = self.expert_loads.summary()
        for warning in warnings:
            say(f"warning: {warning}", err=True)
        self.log.append({**row, **shares})
        if self.tracker is not None:
            self.tracker.log({**row, **shares}, self.progress.step)

    # ---- what a checkpoint holds -------------------------------------------------------------

    def save(self):
        """The weights later stages read (and no older ones in the other --save_format), then the resume state;
        resume states beyond --keep_last are removed.
        Every process calls it (FSDP gathers shards); the main process writes."""
        self.read_steps()  # the skipped steps' count, and no save of a run that diverged since the last read
        state = self.state_dict()

        def write():
            self.paths.dir.mkdir(parents=True, exist_ok=True)
            self.write_weights(self.raw_model, state["model"], self.paths)
            self.paths.other_weights.unlink(missing_ok=True)
            written = self.paths.resume_state(state["progress"]["step"])
            atomic_write(written, lambda tmp: torch.save(state, tmp))
            # Only this state and those before it count: a later one is one a resume found unreadable and fell back
            # from, and counting it would delete the good states (the names sort as the steps do).
            for old in [path for path in self.paths.resume_states() if path <= written][:-self.args.keep_last]:
                old.unlink(missing_ok=True)

        distributed.main_process_alone(write)

    def state_dict(self):
        """Everything `--resume` needs to continue exactly. Every process must call it (FSDP gathers the shards,
        GRPO every process's pending rollouts)."""
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizers)
        return {
            "progress": asdict(self.progress), "model": model_state, "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(), "rng": rng_state(self.device), "objective": self.objective.state_dict(),
            "flags": {name: getattr(self.args, name) for name in RESUME_FLAGS + self.same_run_flags},
            "world_size": self.world_size, "data_order": LENGTH_GROUP_STEPS, "samples": len(self.dataset),
            "log_rows": self.log.rows(),
            "run_id": self.run_id,
        }

    def load_state_dict(self, state):
        # The groups' settings (weight decay, betas, Muon's momentum) are this run's flags, as their rates are:
        # loading an optimizer's state brings back the saved run's, so this run's are put back over them.
        settings = [[{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
                    for optimizer in self.optimizers]
        distributed.load_full_state_dicts(self.model, self.optimizers, state["model"], state["optimizer"])
        for optimizer, groups in zip(self.optimizers, settings):
            for group, own in zip(optimizer.param_groups, groups):
                group.update(own)
        if state["scaler"]:  # empty when the run trained without float16; a float16 run then starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.device)
        self.objective.load_state_dict(state.get("objective", {}))
        self.progress = Progress(**state["progress"])
        self.read_at = self.progress.step
        self.run_id = state.get("run_id", self.run_id)
        if distributed.is_main():
            self.log.truncate(state["log_rows"])

    def resume(self):
        path, state = read_resume_state(self.paths)
        check_resume_flags(state, self.args, self.world_size, self.paths, self.same_run_flags)
        self.log.check_continues()
        self.load_state_dict(state)
        if state.get("samples", len(self.dataset)) != len(self.dataset):
            say(f"warning: the training data ({self.args.data_path}) has {len(self.dataset):,} samples where the run in "
                f"{self.paths.dir} had {state['samples']:,}: the rest of this epoch follows another order, so the "
                "continuation is not the run's (to train on other data from these weights, start a run with "
                "--init_from)", err=True)
        say(f"resumed {path.name}: step {self.progress.step} of {self.total_steps}", err=True)
