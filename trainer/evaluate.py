"""Held-out perplexity: exp of the mean masked cross-entropy over every trained token of a dataset."""

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import masked_cross_entropy

from .precision import autocast_context


@torch.no_grad()
def perplexity(model, dataset, args, max_samples=None):
    """Token-weighted: exp(Σ masked CE / Σ mask) over the first `max_samples` samples (all when None),
    batched as training batches them (padded to each batch's longest sample)."""
    samples = dataset if max_samples is None or max_samples >= len(dataset) else Subset(dataset, range(max_samples))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_ce, total_tokens = 0.0, 0
    loader = DataLoader(samples, batch_size=args.batch_size, collate_fn=dataset.collate)
    for batch in tqdm(loader, desc="perplexity", leave=False):
        batch = batch.to(device)
        with autocast_context(args):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
        tokens = int(batch.loss_mask.sum())
        total_ce += masked_cross_entropy(logits, batch.targets, batch.loss_mask).item() * tokens
        total_tokens += tokens
    model.train(was_training)
    return float(torch.exp(torch.tensor(total_ce / max(total_tokens, 1))))
