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
import torch.nn.functional as F

from dataset import token_bytes
from model import masked_cross_entropy, masked_mean, token_cross_entropy
from model.model import ChunkedCrossEntropy

from .errors import UserError
from .evaluate import eval_batches, language_model_scores


@dataclass
class Step:
    """What an objective knows about the optimizer step a micro-batch belongs to."""

    units: int | torch.Tensor  # the step's units (see Objective.units) over every micro-batch and process: a
    # 0-dim tensor under torchrun, where it is all-reduced on the device and never read back
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

    # The names of `evaluate`'s figures, in order: the CSV log's val_* columns.
    held_out: tuple[str, ...] = ()

    def evaluate(self, model, dataset, args) -> dict:
        """Held-out figures (name → value) the stage reports before, during (--eval_interval) and after training."""
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def check_same_source(what, flag, saved, now):
    """A resumed run must keep the frozen model it started with."""
    if saved != now:
        raise UserError(f"--resume: the run's {what} came from {saved}, not {now}; pass {flag} {saved}")


def moe_aux_share(out, step):
    """The MoE load-balancing loss is a mean over the step's forwards, not over tokens."""
    return out.aux_loss / (step.micro_batches * step.processes)


class LanguageModeling(Objective):
    """Next-token cross-entropy over the step's trained tokens (the loss mask), plus the MoE aux loss, plus
    `z_loss` × the mean log²Z of the logits over the same tokens when it is not 0 (`--z_loss`)."""

    held_out = ("perplexity", "bits per byte")

    def __init__(self, z_loss=0.0):
        self.z_loss = z_loss
        self.metrics = ("ce", "aux", "z") if z_loss else ("ce", "aux")

    def units(self, batch):
        return batch.trained

    def __call__(self, model, batch, step):
        out = model(batch.input_ids, **batch.model_inputs())
        aux = moe_aux_share(out, step)
        if not self.z_loss:
            ce = masked_cross_entropy(out.logits, batch.targets, batch.loss_mask, num_tokens=step.units)
            return Loss(ce + aux, batch.tokens, {"ce": ce.detach(), "aux": aux.detach()})
        per_token, log_z = token_cross_entropy(out.logits, batch.targets, with_log_z=True)
        ce = masked_mean(per_token, batch.loss_mask, step.units)
        z = masked_mean(log_z.square(), batch.loss_mask, step.units)
        return Loss(ce + aux + self.z_loss * z, batch.tokens, {"ce": ce.detach(), "aux": aux.detach(), "z": z.detach()})

    def evaluate(self, model, dataset, args):
        return language_model_scores(model, dataset, args, args.val_samples, token_bytes(dataset.tokenizer))


def token_logprobs(logits, batch):
    """[rows, width] log-probability of each target token, in float32 (padding included: mask it)."""
    return -token_cross_entropy(logits, batch.targets)


def answer_logprobs(logits, batch):
    """Per row, the log-probability of its trained tokens (the loss mask), summed."""
    return (token_logprobs(logits, batch) * batch.loss_mask).sum(dim=1)


def ranked_right(chosen, rejected):
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def add_dpo_flags(parser):
    parser.add_argument_group("DPO").add_argument(
        "--beta", type=float, default=0.1, help="strength of the pull toward the reference: higher stays closer")


class DirectPreference(Objective):
    """DPO: per pair −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), each log-probability
    summed over that answer's tokens, averaged over the step's pairs; plus the MoE aux loss.

    The reference is the starting model, frozen. Rewards are β·(log π − log π_ref) of each answer; a pair is
    ranked right when the chosen answer's reward beats the rejected one's, and half right on a tie (so the
    accuracy starts at 0.5, where policy and reference are one model).
    """

    metrics = ("accuracy", "margin", "chosen_reward", "rejected_reward")
    held_out = ("reward accuracy", "chosen-answer perplexity")

    def __init__(self, reference, beta, start):
        if beta <= 0:
            raise UserError(f"--beta {beta}: must be above 0 (at 0 the loss is ln 2 whatever the model does)")
        self.reference, self.beta, self.start = reference, beta, str(start)
        self.frozen = (reference,)

    def state_dict(self):
        return {"start": self.start}

    def load_state_dict(self, state):
        check_same_source("reference model", "--init_from", state.get("start", self.start), self.start)

    def units(self, batch):
        return len(batch)

    def rewards(self, model, batch):
        """(chosen rewards, rejected rewards, policy log-probabilities, the policy's output)."""
        both, pairs = batch.both, len(batch)
        out = model(both.input_ids, **both.model_inputs())
        policy = answer_logprobs(out.logits, both)
        with torch.no_grad():
            reference = answer_logprobs(self.reference(both.input_ids, **both.model_inputs()).logits, both)
        rewards = self.beta * (policy - reference)
        return rewards[:pairs], rewards[pairs:], policy, out

    def __call__(self, model, batch, step):
        chosen, rejected, _, out = self.rewards(model, batch)
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).sum() / step.units + moe_aux_share(out, step)
        metrics = {"accuracy": ranked_right(chosen, rejected).sum(), "margin": margin.sum(), "chosen_reward": chosen.sum(),
                   "rejected_reward": rejected.sum()}
        return Loss(loss, batch.both.tokens, {name: value.detach() / step.units for name, value in metrics.items()})

    @torch.no_grad()
    def evaluate(self, model, dataset, args):
        correct, pairs, chosen_logprob, chosen_tokens = 0, 0, 0.0, 0
        for batch in eval_batches(model, dataset, args, args.val_samples):
            chosen, rejected, policy, _ = self.rewards(model, batch)
            correct += float(ranked_right(chosen, rejected).sum())
            pairs += len(batch)
            chosen_logprob += float(policy[:len(batch)].sum())
            chosen_tokens += int(batch.both.loss_mask[:len(batch)].sum())
        return {"reward accuracy": correct / pairs,
                "chosen-answer perplexity": float(torch.exp(torch.tensor(-chosen_logprob / max(chosen_tokens, 1))))}


def add_distill_flags(parser):
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, help="the teacher checkpoint or Hugging Face directory")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's soft targets; 0 is plain CE")
    group.add_argument("--distill_temperature", type=float, default=2.0, help="softens both distributions")


def check_distill_flags(args):
    if not 0 <= args.alpha <= 1 or args.distill_temperature <= 0:
        raise UserError(f"--alpha {args.alpha} must lie in [0, 1] and --distill_temperature "
                        f"{args.distill_temperature} be positive")


class Distillation(LanguageModeling):
    """Knowledge distillation over the trained tokens: (1 − α)·CE + α·T²·KL(teacher_T ‖ student_T), both terms
    means over the step's trained tokens, plus the student's MoE aux loss. p_T = softmax(logits / T); T² keeps
    the soft term's gradient on the scale of the hard one's as T grows (Hinton et al.)."""

    metrics = ("ce", "kl", "aux")

    def __init__(self, teacher, alpha, temperature, source):
        self.teacher, self.alpha, self.temperature, self.source = teacher, alpha, temperature, str(source)
        self.frozen = (teacher,)

    def state_dict(self):
        return {"teacher": self.source}

    def load_state_dict(self, state):
        check_same_source("teacher", "--teacher", state.get("teacher", self.source), self.source)

    def __call__(self, model, batch, step):
        out = model(batch.input_ids, **batch.model_inputs())
        with torch.no_grad():
            teacher_logits = self.teacher(batch.input_ids, **batch.model_inputs()).logits
        ce = masked_cross_entropy(out.logits, batch.targets, batch.loss_mask, num_tokens=step.units)
        kl = (soft_kl(teacher_logits, out.logits, self.temperature) * batch.loss_mask).sum() / step.units
        aux = moe_aux_share(out, step)
        loss = (1 - self.alpha) * ce + self.alpha * self.temperature**2 * kl + aux
        return Loss(loss, batch.tokens, {"ce": ce.detach(), "kl": kl.detach(), "aux": aux.detach()})


def soft_kl(teacher_logits, student_logits, temperature):
    """KL(teacher ‖ student) per position between the temperature-softened distributions, in float32, a chunk of
    positions at a time like the cross-entropy (no float32 copy of either model's whole logits)."""
    vocab = student_logits.size(-1)
    kl = ChunkedSoftKL.apply(teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab), temperature)
    return kl.view(student_logits.shape[:-1])


class ChunkedSoftKL(torch.autograd.Function):
    """KL(softmax(t/T) ‖ softmax(s/T)) per row; the gradient reaches the student only: (p_s − p_t) / T."""

    @staticmethod
    def forward(ctx, teacher, student, temperature):
        kl = student.new_empty(student.size(0), dtype=torch.float32)
        for rows in ChunkedCrossEntropy.chunks(student):
            log_p = (teacher[rows].float() / temperature).log_softmax(dim=-1)
            log_q = (student[rows].float() / temperature).log_softmax(dim=-1)
            kl[rows] = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        ctx.save_for_backward(teacher, student)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        teacher, student = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(student)
        for rows in ChunkedCrossEntropy.chunks(student):
            p = (teacher[rows].float() / temperature).softmax(dim=-1)
            q = (student[rows].float() / temperature).softmax(dim=-1)
            grad[rows] = q.sub_(p).mul_(grad_kl[rows, None] / temperature)
        return None, grad, None
