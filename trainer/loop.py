"""The training loop, read top to bottom: data order → micro-batches → loss → optimizer step → log → save.

One optimizer step takes `accumulation_steps` micro-batches. The cross-entropy of each is
divided by the trained-token count of the whole step, so the accumulated gradient is that
of one large batch; the MoE aux loss is averaged over the micro-batches. Every save
writes the weights (`.pth` + config JSON) and a resume state (optimizer, step, data
position, RNG states, flags, log length) so `--resume` continues bit-exactly.
"""

import contextlib
import math
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import masked_cross_entropy

from . import distributed
from .checkpoint import atomic_write, save_weights
from .errors import UserError
from .flags import run_dir, run_name
from .metrics import BASE_COLUMNS, CsvLog, ExpertLoadWatch, load_columns

# Flags a resumed run must share with the run that wrote the state, or the continuation is not the same run.
# The batch flags must match too when the process count is the same; across process counts, the global batch.
RESUME_FLAGS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "max_seq_len", "seed")
BATCH_FLAGS = ("batch_size", "accumulation_steps")
MAX_BAD_STEPS = 5


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # samples of this epoch's order already consumed
    tokens: int = 0  # real (non-padding) input tokens seen
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient


class StopRequested(Exception):
    pass


def note(message):
    """A line for the user on stderr that leaves the progress bar intact (main process only)."""
    if distributed.is_main():
        tqdm.write(message, file=sys.stderr)


def lr_at(step, total_steps, warmup_steps, peak):
    """Linear warmup to `peak`, then cosine decay to peak/10 at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak / 10 + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, args):
    # Weight decay on matrices only: decaying norms' gains and the like only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=fused or None)


# Optimizer steps whose samples are sorted by length together (see epoch_order).
LENGTH_GROUP_STEPS = 32


def epoch_order(lengths, seed, epoch, samples_per_step):
    """The epoch's sample order: one seeded permutation, grouped by length a window at a time.

    Batches are padded to their longest sample, so a batch mixing a 20-token poem with a
    250-token article is mostly padding. Within each window of LENGTH_GROUP_STEPS steps the
    shuffled samples are sorted by length and the window's steps are shuffled back, so each
    step holds samples of similar length while the order stays random at the scale of
    windows. It depends only on (seed, epoch, global batch), so a resumed run and any process
    count see the same order.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator)
    lengths = torch.as_tensor(lengths)
    window = samples_per_step * LENGTH_GROUP_STEPS
    grouped = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[lengths[chunk].argsort(descending=True, stable=True)]
        steps = chunk.split(samples_per_step)
        # Only the epoch's last step can be short; it stays last, or every later step would be cut off-boundary.
        full = len(steps) if len(steps[-1]) == samples_per_step else len(steps) - 1
        grouped += [steps[i] for i in torch.randperm(full, generator=generator).tolist()] + list(steps[full:])
    return torch.cat(grouped).tolist() if grouped else []


def resume_states(directory, name):
    return sorted(Path(directory).glob(f"{name}_resume_*.pt"))


def log_path(directory, name):
    return Path(directory) / f"{name}_log.csv"


def prepare_run_dir(stage, args):
    """Check that the run folder is writable, that --resume has a state there to continue, and that a fresh
    run would not overwrite an earlier one's. Stages call it first (on the main process), so a wrong folder
    fails before the data is tokenized."""
    directory, name = run_dir(stage, args), run_name(stage, args)
    earlier = resume_states(directory, name)
    if args.resume and not earlier:
        raise no_resume_state(directory, name)
    if earlier and not args.resume:
        raise UserError(
            f"{directory} holds an earlier {name} run (up to step {int(earlier[-1].stem.rsplit('_', 1)[1])}): "
            f"pass --resume to continue it, or move that folder away (or pick another --out_dir) to start afresh"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise UserError(f"--out_dir {args.out_dir}: cannot write to {directory} ({err.strerror})") from None


def no_resume_state(directory, name):
    return UserError(f"--resume: no resume state ({name}_resume_*.pt) in {directory}; run without --resume")


def autocast_context(args):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.dtype))


def trim_padding(input_ids, targets, loss_mask, pad_token_id):
    """Cut the columns past every row's last real token (they cost compute and change no loss or gradient)
    and add the attention mask. Padding only ever trails the text, so a pad id inside it is a real token."""
    positions = torch.arange(1, input_ids.size(1) + 1)
    lengths = ((input_ids != pad_token_id) * positions).amax(dim=1)
    width = max(int(lengths.max()), 1)
    attention_mask = positions[:width] <= lengths[:, None]
    return input_ids[:, :width], targets[:, :width], loss_mask[:, :width], attention_mask


def gradient_sync(model, last_micro_batch):
    """DDP all-reduces gradients on every backward; skipping it until the last micro-batch saves the traffic."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, model, dataset, args, stage, pad_token_id):
        self.raw_model = model.to(args.device)
        if args.grad_checkpointing:
            self.raw_model.gradient_checkpointing_enable()
        self.model = distributed.wrap(self.raw_model, args)
        # Only the training forward is compiled; state dicts and DDP's no_sync keep using the module itself.
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.dataset = dataset
        self.args = args
        self.stage = stage
        self.pad_token_id = pad_token_id
        self.device = torch.device(args.device)
        self.dir = run_dir(stage, args)
        self.name = run_name(stage, args)
        self.weights_path = self.dir / f"{self.name}.{args.save_format}"
        self.optimizer = make_optimizer(self.raw_model, args)
        # A GradScaler only for float16: bf16 has float32's exponent range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.dtype == "float16")
        self.world_size = distributed.world_size()
        self.samples_per_step = args.batch_size * args.accumulation_steps * self.world_size
        self.steps_per_epoch = math.ceil(len(dataset) / self.samples_per_step)
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        self.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, self.total_steps // 50)
        self.moe_watch = ExpertLoadWatch(model.moe_layers())
        columns = BASE_COLUMNS
        if self.moe_watch.layers:
            columns = columns + load_columns(len(self.moe_watch.layers), self.moe_watch.layers[0].n_experts)
        self.log = CsvLog(log_path(self.dir, self.name), columns)
        self.progress = Progress()
        self.bad_steps_in_a_row = 0
        self.stop_signal = None

    # ---- the loop ----------------------------------------------------------------------------

    def train(self):
        if self.args.resume:
            self.restore()
        elif distributed.is_main():
            self.log.path.unlink(missing_ok=True)  # a fresh run's log starts empty
        previous_handlers = self.install_signal_handlers()
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc=self.name, dynamic_ncols=True,
                   disable=not distributed.is_main())
        try:
            self.run_steps(bar)
        except StopRequested:
            bar.close()
            self.save()
            note(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.progress.step}; checkpoint "
                       f"saved in {self.dir}. Resume with the same command plus --resume")
            raise SystemExit(128 + self.stop_signal) from None
        finally:
            bar.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        self.save()
        return self.progress

    def run_steps(self, bar):
        interval_start, interval_tokens = time.perf_counter(), 0
        while self.progress.step < self.total_steps:
            for micro_batches in self.step_batches():
                tokens_before = self.progress.tokens
                stats = self.optimizer_step(micro_batches)
                interval_tokens += self.progress.tokens - tokens_before
                step = self.progress.step
                if step % self.args.log_interval == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - interval_start
                    self.write_log(stats, interval_tokens / max(elapsed, 1e-9))
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", ce=f"{stats['ce']:.3f}", aux=f"{stats['aux']:.3f}",
                                    lr=f"{stats['lr']:.2e}", tok_s=f"{interval_tokens / max(elapsed, 1e-9):.0f}")
                    interval_start, interval_tokens = time.perf_counter(), 0
                bar.update(1)
                if step % self.args.save_interval == 0 and step < self.total_steps:
                    self.save()
                if self.stop_requested():
                    raise StopRequested
                if step >= self.total_steps:
                    return

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
            num_workers=self.args.num_workers,
            # Its own generator: seeding workers must not draw from the global RNG a resumed run restores.
            generator=torch.Generator().manual_seed(self.args.seed),
            pin_memory=self.device.type == "cuda",
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
        args, model = self.args, self.model
        lr = lr_at(self.progress.step, self.total_steps, self.warmup_steps, args.learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        step_tokens = int(distributed.all_reduce_sum(
            torch.tensor(sum(int(mask.sum()) for _, _, mask in micro_batches), device=self.device)))
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        load_sum = torch.zeros((), device=self.device)
        tokens = 0
        for index, micro_batch in enumerate(micro_batches):
            input_ids, targets, loss_mask, attention_mask = (
                tensor.to(self.device, non_blocking=True) for tensor in trim_padding(*micro_batch, self.pad_token_id))
            with autocast_context(args), gradient_sync(model, index == len(micro_batches) - 1):
                out = self.forward(input_ids, attention_mask=attention_mask)
                ce = masked_cross_entropy(out.logits, targets, loss_mask, num_tokens=step_tokens)
                aux = out.aux_loss / len(micro_batches)
                # DDP and FSDP average gradients over processes; each process's CE is already its share
                # of the global mean, so scaling by world_size turns that average back into the sum.
                self.scaler.scale(ce * self.world_size + aux).backward()
            ce_sum += ce.detach()
            aux_sum += aux.detach()
            micro_tokens = int(attention_mask.sum())
            # Weighted by real tokens, the shares add up to the step's global share, however the batch is split.
            load_sum = load_sum + self.moe_watch.current(self.device) * micro_tokens
            tokens += micro_tokens
        # One all-reduce for everything the processes must agree on: loss parts, tokens, expert loads.
        totals = torch.cat([torch.stack([ce_sum, aux_sum, torch.tensor(float(tokens), device=self.device)]),
                            load_sum.flatten()])
        totals = distributed.all_reduce_sum(totals).cpu()
        ce_sum, aux_sum = totals[0], totals[1] / self.world_size
        self.progress.tokens += int(totals[2])
        loss = ce_sum + aux_sum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        # float16's GradScaler skips inf/NaN gradients itself and lowers its scale: that is not divergence.
        if torch.isfinite(loss) and (torch.isfinite(grad_norm) or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)
            self.bad_steps_in_a_row = 0
        else:
            self.skip_bad_step(loss, grad_norm)
        self.scaler.update()  # also after a skip: unscale_ ran, and the next step's unscale_ needs a fresh state
        self.optimizer.zero_grad(set_to_none=True)
        if self.moe_watch.layers:
            self.moe_watch.observe(totals[3:].view(len(self.moe_watch.layers), -1) / totals[2].clamp(min=1))
        self.progress.step += 1
        self.progress.position += sum(len(batch[0]) for batch in micro_batches) * self.world_size
        return {"loss": loss.item(), "ce": ce_sum.item(), "aux": aux_sum.item(), "lr": lr,
                "grad_norm": grad_norm.item()}

    def skip_bad_step(self, loss, grad_norm):
        """A non-finite loss or gradient skips the update; several in a row stop the run, keeping the last save."""
        self.progress.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        note(f"step {self.progress.step + 1}: non-finite loss {loss.item()} or gradient norm "
                   f"{grad_norm.item()}; update skipped ({self.progress.skipped_steps} so far)")
        if self.bad_steps_in_a_row >= MAX_BAD_STEPS:
            raise UserError(
                f"{MAX_BAD_STEPS} non-finite steps in a row at step {self.progress.step + 1}: training diverged. "
                f"The last good checkpoint in {self.dir} is kept; lower --learning_rate or use --dtype float32"
            )

    def write_log(self, stats, tokens_per_s):
        if not distributed.is_main():
            return
        row = {"step": self.progress.step, "tokens": self.progress.tokens, "tokens_per_s": round(tokens_per_s, 1),
               **{key: round(value, 6) for key, value in stats.items()}}
        shares, warnings = self.moe_watch.summary()
        for warning in warnings:
            note(f"warning: {warning}")
        self.log.append({**row, **shares})

    # ---- saving and resuming -----------------------------------------------------------------

    def save(self):
        """Weights + config, then the resume state; older resume states beyond --keep_last are removed."""
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizer)
        distributed.main_process_alone(lambda: self.write_checkpoint(model_state, optimizer_state))

    def write_checkpoint(self, model_state, optimizer_state):
        self.dir.mkdir(parents=True, exist_ok=True)
        save_weights(model_state, self.raw_model.config, self.weights_path)
        state = {
            "progress": asdict(self.progress),
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "flags": {name: getattr(self.args, name) for name in RESUME_FLAGS + BATCH_FLAGS},
            "world_size": self.world_size,
            "data_order": LENGTH_GROUP_STEPS,
            "log_rows": self.log.rows(),
        }
        path = self.dir / f"{self.name}_resume_{self.progress.step:08d}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in resume_states(self.dir, self.name)[: -self.args.keep_last]:
            old.unlink(missing_ok=True)

    def restore(self):
        states = resume_states(self.dir, self.name)
        if not states:
            raise no_resume_state(self.dir, self.name)
        for path in reversed(states):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                break
            except Exception as err:  # a state cut off by a crash: fall back to the one before it
                note(f"warning: {path} is unreadable ({type(err).__name__}); trying the previous state")
        else:
            raise UserError(f"--resume: every resume state in {self.dir} is unreadable; run without --resume")
        saved_order = state.get("data_order")
        if saved_order != LENGTH_GROUP_STEPS:  # its data position may count into another order than this epoch's
            reason = ("does not record its data order" if saved_order is None
                      else f"was written with another data order (length groups of {saved_order} steps)")
            note(f"warning: {path.name} {reason}; the rest of this epoch may repeat some samples and skip others")
        self.check_resume_flags(state["flags"], state["world_size"])
        distributed.load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.progress = Progress(**state["progress"])
        if distributed.is_main():
            self.log.truncate(state["log_rows"])
        note(f"resumed {path.name}: step {self.progress.step} of {self.total_steps}")

    def check_resume_flags(self, saved, saved_world_size):
        same_world = saved_world_size == self.world_size
        for name in RESUME_FLAGS + (BATCH_FLAGS if same_world else ()):
            if getattr(self.args, name) != saved[name]:
                raise UserError(
                    f"--resume: --{name} is {getattr(self.args, name)} but the run in {self.dir} used {saved[name]}; "
                    f"pass --{name} {saved[name]} or start a new run without --resume"
                )
        saved_global = saved["batch_size"] * saved["accumulation_steps"] * saved_world_size
        if self.samples_per_step != saved_global:
            raise UserError(
                f"--resume: --batch_size × --accumulation_steps × processes is {self.samples_per_step} but the run in "
                f"{self.dir} used {saved_global} ({saved_world_size} processes); choose flags that give {saved_global}"
            )

    # ---- signals -----------------------------------------------------------------------------

    def stop_requested(self):
        """Whether any process got a stop signal: all must stop at the same step to save together."""
        stop = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if distributed.all_reduce_sum(stop).item() and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return self.stop_signal is not None

    def install_signal_handlers(self):
        """Ctrl-C / SIGTERM finish the current step, save, and exit; a second one exits at once."""

        def request_stop(sig, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = sig
            note(f"{signal.Signals(sig).name}: saving a checkpoint after this step ...")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        return previous


def _as_tuple(value):
    """random.getstate() round-trips through torch.save as lists; setstate wants tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def describe_run(model, dataset, trainer):
    total, active = model.parameter_counts()
    args = trainer.args
    planned = trainer.total_steps * trainer.samples_per_step * (args.max_seq_len - 1)
    return (
        f"model: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token | "
        f"data: {len(dataset):,} samples from {Path(args.data_path)} | plan: {trainer.total_steps:,} steps × "
        f"{trainer.samples_per_step} samples × {args.max_seq_len - 1} tokens = {planned / 1e6:.1f}M token slots"
    )
