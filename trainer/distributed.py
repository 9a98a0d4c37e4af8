"""Processes: the torchrun environment, the few collectives the loop needs, stop signals, and `say`.

Run any stage as `torchrun --nproc_per_node N 1-pretrain.py ...`: NCCL on CUDA, Gloo on CPU.
With one process (no torchrun) every helper here is a no-op, so the loop reads the same.
"""

import contextlib
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# A collective that waits longer than this is a hung job: the training steps' all-reduces and gathers.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# While the main process works alone (tokenizing a large corpus, writing a checkpoint) the others wait this long.
WAIT_FOR_MAIN_TIMEOUT = timedelta(hours=12)
_waiting_group = None  # a Gloo group for those waits, so no NCCL watchdog ends them


def setup(args):
    """Join the process group torchrun describes; on CUDA each process takes its LOCAL_RANK device."""
    global _waiting_group
    if not launched_by_torchrun() or dist.is_initialized():
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=torch.device(args.device) if cuda else None)
    _waiting_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN_TIMEOUT)


def shutdown(finished=True):
    """Leave the process groups: after a run every process finished, together (none tears its groups down while
    another still talks to it); after an error at once, so that torchrun ends the others."""
    global _waiting_group
    if dist.is_initialized():
        if finished:
            dist.barrier(group=_waiting_group)
        dist.destroy_process_group(_waiting_group)
        _waiting_group = None
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank; torchrun's before the process group starts and after it ends (so an error every
    process raises is said once)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def say(message, err=False):
    """The one way to tell the user something: once (main process), without breaking a progress bar;
    results on stdout, notes, warnings and errors (`err=True`) on stderr."""
    if is_main():
        tqdm.write(str(message), file=sys.stderr if err else sys.stdout)


def all_reduce_sum(tensor):
    """Sum over processes, in place; returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value):
    """Every process's `value` (picklable), in rank order; every process must call it. One process: [value]."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(tensors):
    """Every process's `tensors` set, in place, to the main process's."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def whole(tensor):
    """A plain tensor of the whole value (FSDP2's gradient norm is a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main_process_alone(work):
    """Run `work()` on the main process while the others wait for the outcome (writing a checkpoint, checking
    the run folder). If it raises, the main process raises (its one `error:` line) and the others exit
    quietly with code 2, instead of crashing in their next collective with a trace that buries that line."""
    if not dist.is_initialized():
        return work()
    ok = False
    try:
        if is_main():
            work()
        ok = True
    finally:
        ok = _main_outcome(ok)
    if not ok:
        raise SystemExit(2)


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first (e.g. building the dataset cache), then the others reuse its work;
    if it fails there, the others exit quietly as in `main_process_alone`."""
    if not dist.is_initialized():
        yield
        return
    if not is_main() and not _main_outcome():
        raise SystemExit(2)
    ok = False
    try:
        yield
        ok = True
    finally:
        if is_main():
            _main_outcome(ok)


def _main_outcome(ok=None):
    """Whether the main process's step succeeded, sent from it to every process (which wait for it here)."""
    outcome = [ok]
    dist.broadcast_object_list(outcome, src=0, group=_waiting_group)
    return outcome[0]


def wrap(model, args):
    """DDP by default, FSDP2 (`fully_shard` per block, then the root) with --fsdp; the bare model alone.

    Every MoE expert runs on every step (possibly on zero tokens), so every parameter gets a
    gradient and DDP needs no `find_unused_parameters`.
    """
    if not dist.is_initialized():
        return model
    if getattr(args, "fsdp", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Under bf16 the gathered weights and the gradients' reduce-scatter move in bf16 rather than fp32 (half the
        # traffic), the reduction summing in fp32; the sharded master weights and the optimizer stay fp32.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if args.dtype == "bfloat16" else MixedPrecisionPolicy())
        for block in model.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    device_ids = [torch.device(args.device).index] if args.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def full_state_dicts(model, optimizer):
    """(model, optimizer) state dicts as one process holds them, keyed by parameter name, whatever the wrapping
    (none, DDP or FSDP), so a resume state written by any number of processes loads into any other.
    Under FSDP this gathers shards: every process must call it."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model, optimizer, model_state, optimizer_state):
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


class StopSignals:
    """Within the block, Ctrl-C / SIGTERM ask the loop to stop after the current step (a second one exits at
    once). A signal is only pending until the processes agree: every process adds `local()` to the step's
    all-reduce and hands the sum to `agree` (one process: its own value), so all stop at the same step to save,
    whenever between two all-reduces each got its signal; `requested()` then tells."""

    def __init__(self):
        self.pending = None  # the signal this process got, not yet agreed on
        self.signal = None  # the agreed one: stop after this step

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def request(self, sig, frame):
        if self.pending is not None:
            raise KeyboardInterrupt
        self.pending = sig
        say(f"{signal.Signals(sig).name}: saving a checkpoint after this step ...", err=True)

    def local(self) -> float:
        return float(self.pending is not None)

    def agree(self, processes_stopping):
        """`processes_stopping`: the sum of `local()` over the processes, taken in the same step by all."""
        if processes_stopping and self.signal is None:
            self.signal = self.pending or signal.SIGTERM

    def requested(self):
        return self.signal is not None
