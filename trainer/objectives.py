"""What a stage optimises: the `Objective` contract the loop runs, and language modeling (stages 1 and 2).

The loop knows only this contract. For each optimizer step it hands the objective the
step's micro-batches (`prepare` may replace them, e.g. by sampling completions), asks
each micro-batch how many units the step's loss is averaged over (`units`: trained
tokens, preference pairs, ...), sums them over micro-batches and processes, and then
calls the objective once per micro-batch with that `Step`. The objective returns its
micro-batch's *share* of the step's loss and metrics, normalised so that summing the
shares over micro-batches and processes gives the step's value: accumulated gradients
then equal one large batch's, however the step is split.

An objective may run modules that do not train (a frozen reference model, a teacher):
it lists them in `frozen`, and the trainer moves them to the device and keeps them in
eval mode without gradients. Any state it needs to continue exactly (a sampling RNG)
goes in `state_dict`, which the resume state carries.
"""

from dataclasses import dataclass, field

import torch

from model import masked_cross_entropy


@dataclass
class Step:
    """What an objective knows about the optimizer step a micro-batch belongs to."""

    units: int  # the step's units (see Objective.units) over every micro-batch and process
    micro_batches: int  # per process
    processes: int


@dataclass
class Loss:
    loss: torch.Tensor  # this micro-batch's share of the step's loss, to backpropagate
    tokens: int  # real tokens its forwards read (throughput and the progress count)
    metrics: dict = field(default_factory=dict)  # name → 0-dim tensor, shares of the step's values like `loss`


class Objective:
    metrics: tuple = ()  # names of the metrics it returns, logged after "loss"
    frozen: tuple = ()  # modules it runs but never trains

    def prepare(self, model, micro_batches):
        """The micro-batches to train on this step (the data loader's by default)."""
        return micro_batches

    def units(self, batch) -> int:
        """How many of what the step's loss is a mean over this micro-batch holds."""
        raise NotImplementedError

    def __call__(self, model, batch, step: Step) -> Loss:
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def moe_aux_share(out, step):
    """The MoE load-balancing loss is a mean over the step's forwards, not over tokens."""
    return out.aux_loss / (step.micro_batches * step.processes)


class LanguageModeling(Objective):
    """Next-token cross-entropy over the step's trained tokens (the loss mask), plus the MoE aux loss."""

    metrics = ("ce", "aux")

    def units(self, batch):
        return int(batch.loss_mask.sum())

    def __call__(self, model, batch, step):
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
        ce = masked_cross_entropy(out.logits, batch.targets, batch.loss_mask, num_tokens=step.units)
        aux = moe_aux_share(out, step)
        return Loss(ce + aux, batch.tokens, {"ce": ce.detach(), "aux": aux.detach()})
