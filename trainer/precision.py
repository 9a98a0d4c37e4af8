"""Number formats a run computes in: the autocast context and the loss scaler that goes with it."""

import contextlib

import torch


def autocast_context(args):
    """Autocast to `args.dtype` on `args.device`; float32 runs without it."""
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.dtype))


def grad_scaler(args):
    """A GradScaler only for float16: bf16 has float32's exponent range and needs no loss scaling."""
    return torch.amp.GradScaler(torch.device(args.device).type, enabled=args.dtype == "float16")
