"""Held-out perplexity: exp of the mean masked cross-entropy over every trained token of a dataset."""

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import masked_cross_entropy

from .loop import autocast_context


@torch.no_grad()
def perplexity(model, dataset, args, max_samples=None):
    """Token-weighted: exp(Σ masked CE / Σ mask) over the first `max_samples` samples (all when None)."""
    if max_samples is not None and max_samples < len(dataset):
        dataset = Subset(dataset, range(max_samples))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_ce, total_tokens = 0.0, 0
    for input_ids, targets, loss_mask in tqdm(DataLoader(dataset, batch_size=args.batch_size), desc="perplexity",
                                              leave=False):
        input_ids, targets, loss_mask = input_ids.to(device), targets.to(device), loss_mask.to(device)
        with autocast_context(args):
            logits = model(input_ids).logits
        tokens = int(loss_mask.sum())
        total_ce += masked_cross_entropy(logits, targets, loss_mask).item() * tokens
        total_tokens += tokens
    model.train(was_training)
    return float(torch.exp(torch.tensor(total_ce / max(total_tokens, 1))))
