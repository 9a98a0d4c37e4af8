"""A training run's folder: where its files go, the checks before it starts, and the resume state.

`{out_dir}/{stage}_{model_type}/` holds the weights later stages read (model/weights.py writes them), the CSV
log, and the resume states: the trainer's `state_dict()` (weights, optimizer, progress, RNG states, the
objective's own state, the flags that must not change), from which `--resume` continues bit-exactly.
"""

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset import LENGTH_GROUP_STEPS

from .distributed import say
from .errors import UserError
from .flags import MODEL_FLAGS

# Flags a resumed run must share with the run that wrote the state, or the continuation is not the same run.
# The batch flags must match too when the process count is the same; across process counts, the global batch.
# --eval_tasks: the CSV log's columns were written for the tasks the run began with.
SAME_RUN_FLAGS = ("model_type", *MODEL_FLAGS, "max_seq_len", "seed", "optimizer", "eval_tasks", "pack", "pack_fit",
                  "decay_fraction")
BATCH_FLAGS = ("batch_size", "accumulation_steps")
# The recipe's rates and schedule: a resumed run may change them when its command line says so, but a default that
# differs from the run's (a stage's default changed since it started) is refused, naming the flag.
RECIPE_FLAGS = ("learning_rate", "embedding_lr", "head_lr", "schedule", "final_lr_fraction", "muon_momentum", "normuon",
                "polar_express", "weight_decay", "adam_beta1", "adam_beta2")
RESUME_FLAGS = SAME_RUN_FLAGS + BATCH_FLAGS + RECIPE_FLAGS


@dataclass(frozen=True)
class RunPaths:
    """Every file of one run: `{out_dir}/{stage}_{model_type}/{stage}_{hidden}[_moe]{suffix}`."""

    dir: Path
    name: str  # e.g. pretrain_512_moe
    save_format: str = "pth"

    @property
    def weights(self) -> Path:
        return self.dir / f"{self.name}.{self.save_format}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}_log.csv"

    def resume_state(self, step) -> Path:
        return self.dir / f"{self.name}_resume_{step:08d}.pt"

    def resume_states(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}_resume_*.pt"))

    @property
    def other_weights(self) -> Path:
        """The weights in the other --save_format: removed once these are written (a run resumed in another format),
        so a later stage never reads the older file."""
        return self.weights.with_suffix(".safetensors" if self.save_format == "pth" else ".pth")

    def existing_weights(self) -> Path:
        """The weights a later stage reads: the `.pth`, or the `.safetensors` when only that exists."""
        pth = self.dir / f"{self.name}.pth"
        safetensors = pth.with_suffix(".safetensors")
        return safetensors if safetensors.is_file() and not pth.is_file() else pth


def run_paths(stage, args) -> RunPaths:
    moe = args.model_type == "moe"
    return RunPaths(Path(args.out_dir) / f"{stage}_{args.model_type}", f"{stage}_{args.hidden_size}{'_moe' * moe}",
                    getattr(args, "save_format", "pth"))


def prepare_run_dir(paths, args):
    """Check that the run folder is writable, that --resume has a state there to continue, and that a fresh
    run would not overwrite an earlier one's. Stages call it first (on the main process), so a wrong folder
    fails before the data is tokenized."""
    earlier = paths.resume_states()
    if args.resume and not earlier:
        raise no_resume_state(paths)
    if earlier and not args.resume:
        raise UserError(
            f"{paths.dir} holds an earlier {paths.name} run (up to step {int(earlier[-1].stem.rsplit('_', 1)[1])}): "
            f"pass --resume to continue it, or move that folder away (or pick another --out_dir) to start afresh"
        )
    try:
        paths.dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=paths.dir).close()
    except OSError as err:
        raise UserError(f"--out_dir {args.out_dir}: cannot write to {paths.dir} ({err.strerror})") from None


def no_resume_state(paths):
    return UserError(f"--resume: no resume state ({paths.name}_resume_*.pt) in {paths.dir}; run without --resume")


def read_resume_state(paths):
    """(path, state) of the newest readable resume state (one cut off by a crash falls back to the one before)."""
    states = paths.resume_states()
    if not states:
        raise no_resume_state(paths)
    for path in reversed(states):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as err:
            say(f"warning: {path} is unreadable ({type(err).__name__}); trying the previous state", err=True)
    else:
        raise UserError(f"--resume: every resume state in {paths.dir} is unreadable; run without --resume")
    saved_order = state.get("data_order")
    if saved_order != LENGTH_GROUP_STEPS:  # its data position may count into another order than this epoch's
        reason = ("does not record its data order" if saved_order is None
                  else f"was written with another data order (length groups of {saved_order} steps)")
        say(f"warning: {path.name} {reason}; the rest of this epoch may repeat some samples and skip others",
            err=True)
    return path, state


def check_resume_flags(state, args, world_size, paths, same_run_flags=()):
    """The flags of this run must continue the saved one (the shared ones and the stage's `same_run_flags`); else
    one line naming the flag and its value."""
    saved, saved_world_size = state["flags"], state["world_size"]
    for name in SAME_RUN_FLAGS + tuple(same_run_flags) + (BATCH_FLAGS if saved_world_size == world_size else ()):
        if name in saved and getattr(args, name) != saved[name]:
            raise UserError(f"--resume: --{name} is {getattr(args, name)} but the run in {paths.dir} used "
                            f"{saved[name]}; pass --{name} {saved[name]} or start a new run without --resume")
    given = getattr(args, "given_flags", set())
    for name in RECIPE_FLAGS:
        if saved.get(name) is not None and name not in given and getattr(args, name) != saved[name]:
            raise UserError(f"--resume: the run in {paths.dir} used --{name} {saved[name]} and this run's default is "
                            f"{getattr(args, name)}; pass --{name} {saved[name]} to continue it as it was (or the value "
                            "you want)")
    samples_per_step = args.batch_size * args.accumulation_steps * world_size
    saved_global = saved["batch_size"] * saved["accumulation_steps"] * saved_world_size
    if samples_per_step != saved_global:
        raise UserError(
            f"--resume: --batch_size × --accumulation_steps × processes is {samples_per_step} but the run in "
            f"{paths.dir} used {saved_global} ({saved_world_size} processes); choose flags that give {saved_global}"
        )


def rng_state(device):
    """This process's random states. CUDA's is the state of this process's own `device` only, so a run resumes
    whatever number of devices is visible."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list):  # a state written when every visible device's was kept: this device's, if there
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _as_tuple(value):
    """random.getstate() round-trips through torch.save as lists; setstate wants tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
