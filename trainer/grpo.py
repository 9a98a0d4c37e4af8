"""GRPO: group relative policy optimisation with rewards a program checks (6-grpo.py).

Each optimizer step samples `num_generations` completions for every prompt (one batch of G rows
per prompt, decoded together with the KV cache), scores them with the reward function, and turns
each group's rewards into advantages: (reward − group mean) / (group std + ε). A group whose
rewards are all equal has zero advantages and adds no gradient. The policy loss is the clipped
ratio objective over the completion tokens only, plus β times the per-token KL to the frozen
reference (the k3 estimator exp(ref − logp) − (ref − logp) − 1).

Normalisation: the per-token losses are summed over every completion token of the step and
divided by that count (over micro-batches and processes), as in DAPO and Dr. GRPO, rather than
averaged per sequence first as in the original GRPO. Per-sequence averaging gives each token of a
short completion more weight than each token of a long one, which biases the update toward short
right answers and long wrong ones; a token-level mean weights every generated token alike and
keeps accumulation equal to one large batch.

With `--num_iterations` 1 (the default) each step samples from the current policy and updates once,
so the "old" log-probabilities are the current ones, detached: the ratio is 1 and its gradient is
the policy gradient. With μ > 1 the rollouts of one sampling step train μ optimizer steps against
the log-probabilities they had when sampled, and the clipping (and its logged share) engages as the
policy moves away from them; the prompts the data order has for the μ − 1 steps between are skipped.

With `--tools` a rollout is a conversation: the model answers; while its answer calls tools (up to
`--max_tool_calls` rounds) the calls run, their results are appended as the chat template frames them, and
the model goes on. The sequence trained is the prompt, every answer and every result, with the loss mask on
the model's own tokens only; the reward reads the final answer's text (its thinking and calls left out).
"""

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset import Batch, collate
from dataset.chat import read_reply, render_chat
from dataset.jsonl import line_number
from dataset.rewards import REWARDS
from model import Sampling, stream_tokens
from model.generate import GREEDY_BELOW

from . import distributed
from .errors import UserError
from .evaluate import eval_batches
from .flags import check_ranges
from .objectives import Loss, Objective, check_same_source, moe_aux_share, token_logprobs
from .precision import autocast_context
from .tools import load_tools


def add_grpo_flags(parser):
    group = parser.add_argument_group("GRPO")
    group.add_argument("--reward", choices=("exact", "numeric", "contains"), default="numeric",
                       help="for lines without their own \"reward\": exact (the normalised final answer equals the "
                            "answer), numeric (the last number does) or contains (the answer appears)")
    group.add_argument("--reward_fn", help="path.py:function, your own reward(completion, answer) -> float")
    group.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt (a group)")
    group.add_argument("--max_new_tokens", type=int, default=64, help="longest completion")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the completions")
    group.add_argument("--top_p", type=float, default=1.0)
    group.add_argument("--num_iterations", type=int, default=1,
                       help="optimizer steps each batch of rollouts trains (μ); the prompts of the steps between "
                            "are skipped")
    group.add_argument("--clip_eps", type=float, default=0.2,
                       help="the ratio to the sampling policy is clipped to [1 - eps, 1 + eps] (with μ > 1)")
    group.add_argument("--beta", type=float, default=0.0, help="weight of the per-token KL to the reference")
    group.add_argument("--tools", help="tools the model may call while it answers (as 3-eval.py --tools): each call "
                       "runs, its result joins the conversation and the model goes on; the reward checks the final "
                       "answer, and only the model's own tokens are trained")
    group.add_argument("--max_tool_calls", type=int, default=3, help="rounds of tool calls in one rollout")


def check_grpo_flags(args):
    check_ranges(args, at_least_one=("num_iterations",), not_negative=("clip_eps", "beta", "max_tool_calls"))


# ---- rewards ---------------------------------------------------------------------------------------------


def load_reward_fn(reward_fn):
    """`function` from a user's `path.py:function`."""
    path, _, function = reward_fn.rpartition(":")
    if not path or not Path(path).is_file():
        raise UserError(f"--reward_fn {reward_fn}: give an existing file and a function as path.py:function")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise UserError(f"--reward_fn {reward_fn}: importing {path} failed ({type(err).__name__}: {err})") from None
    if not callable(getattr(module, function, None)):
        raise UserError(f"--reward_fn {reward_fn}: {path} has no function {function}(completion, answer)")
    return getattr(module, function)


# ---- the loss --------------------------------------------------------------------------------------------


def group_advantages(rewards, eps=1e-4):
    """[groups, G] rewards → advantages (r − group mean) / (group std + eps); equal rewards give zeros."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, units):
    """(loss share, KL sum, clipped-token count) over the masked [rows, width] completion tokens.

    Per token: −min(ratio·A, clip(ratio, 1 ± ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1), summed and
    divided by `units`, the step's completion tokens."""
    trained = mask.bool()  # the other places' log-probabilities may be anything: exp of a large one is inf, inf × 0 NaN
    ratio = torch.exp(torch.where(trained, logp - old_logp, 0))
    advantages = advantages[:, None]
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    policy = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    log_ratio = torch.where(trained, ref_logp - logp, 0)
    kl = torch.exp(log_ratio) - log_ratio - 1
    per_token = policy + beta * kl
    clipped = (ratio * advantages > clipped_ratio * advantages) & trained
    return (per_token * mask).sum() / units, (kl * mask).sum(), clipped.sum()


# ---- the objective ---------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One prompt batch's sampled completions, ready to train on."""

    sequences: Batch  # prompt + completion per row; loss_mask covers the completion tokens
    advantages: torch.Tensor  # [rows]
    rewards: torch.Tensor  # [rows]
    groups: int
    seconds: float  # spent generating
    old_logp: torch.Tensor | None = None  # [rows, width] at sampling time, when the rollouts train several steps

    def __len__(self):
        return self.groups

    def to(self, device):
        moved = {name: value.to(device) if hasattr(value, "to") else value for name, value in vars(self).items()}
        return Rollouts(**moved)


class GroupRelativePolicy(Objective):
    metrics = ("reward", "reward_std", "correct", "kl", "completion_len", "clipped", "gen_s", "gen_tok_s")
    held_out = ("accuracy",)

    def __init__(self, reference, tokenizer, args, start):
        if args.fsdp:
            raise UserError("--fsdp: GRPO samples with an unsharded copy of the weights; run it under torchrun "
                            "with DDP (drop --fsdp)")
        if args.num_generations < 2:
            raise UserError(f"--num_generations {args.num_generations}: a group needs at least 2 completions to compare")
        if args.temperature < GREEDY_BELOW:
            raise UserError(f"--temperature {args.temperature}: GRPO compares different completions of one prompt; "
                            f"greedy decoding (any temperature below {GREEDY_BELOW:g}) makes them all alike")
        self.reference, self.tokenizer, self.data_path, self.start = reference, tokenizer, args.data_path, str(start)
        # A user's function scores every line; else a line's own "reward", else --reward.
        self.custom_reward = load_reward_fn(args.reward_fn) if args.reward_fn else None
        self.default_reward = args.reward
        self.frozen = (reference,) if args.beta > 0 else ()
        self.generations, self.max_new_tokens = args.num_generations, args.max_new_tokens
        self.sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
        self.clip_eps, self.beta, self.iterations, self.args = args.clip_eps, args.beta, args.num_iterations, args
        self.generator = torch.Generator(device=args.device)
        self.tools, self.max_tool_calls = load_tools(args.tools), args.max_tool_calls
        self.context = 2 * args.max_seq_len  # a rollout stops growing here (tool results can be long)
        self.sampled_steps, self.reuses_left, self.rollouts = 0, 0, []

    def units(self, rollouts):
        return int(rollouts.sequences.loss_mask.sum())

    def state_dict(self):
        """The sampling position and the rollouts still to be reused, every process's (the generator is reseeded
        for every prompt). Every process calls it."""
        pending = [{**vars(r), "sequences": vars(r.sequences)} for r in self.rollouts] if self.reuses_left else []
        return {"start": self.start, "sampled_steps": self.sampled_steps, "reuses_left": self.reuses_left,
                "rollouts_per_process": distributed.gather_objects(pending)}

    def load_state_dict(self, state):
        check_same_source("reference model", "--init_from", state.get("start", self.start), self.start)
        self.sampled_steps, self.reuses_left = state.get("sampled_steps", 0), state.get("reuses_left", 0)
        per_process = state.get("rollouts_per_process", [state.get("rollouts", [])])
        if self.reuses_left and len(per_process) != distributed.world_size():
            raise UserError(f"--resume: the run stopped with rollouts still to reuse (--num_iterations), sampled by "
                            f"{len(per_process)} processes; resume it with {len(per_process)} (the next sampling "
                            "step may then change the count)")
        mine = per_process[distributed.rank()] if self.reuses_left else []
        self.rollouts = [Rollouts(**{**r, "sequences": Batch(**r["sequences"])}) for r in mine]

    def prepare(self, model, micro_batches):
        """Sample and score this step's rollouts, or, within --num_iterations, reuse the last ones."""
        if self.reuses_left:
            self.reuses_left -= 1
            return self.rollouts
        self.sampled_steps += 1
        was_training = model.training
        model.eval()  # generation leaves the MoE load counters and aux loss alone
        try:
            rollouts = [self.roll_out(model, batch) for batch in micro_batches]
        finally:
            model.train(was_training)
        self.rollouts, self.reuses_left = rollouts, self.iterations - 1
        return rollouts

    def roll_out(self, model, batch):
        started = time.perf_counter()
        samples, rewards = [], []
        with autocast_context(self.args):
            for prompt, answer, reward, index, chat in zip(batch.prompts, batch.answers, batch.rewards, batch.indices,
                                                           batch.chats):
                # Seeded by (seed, sampling step, the prompt's line): a resumed run samples what the uninterrupted
                # one did, whatever the number of processes and however the prompts fall into micro-batches.
                self.generator.manual_seed(hash((self.args.seed, self.sampled_steps, index)) & (2**63 - 1))
                for ids, trained, text in self.converse(model, prompt, chat, self.generations, self.sampling,
                                                        self.generator):
                    rewards.append(self.score(text, answer, reward, index, self.data_path))
                    ids, trained = torch.tensor(ids), torch.tensor(trained)
                    samples.append((ids[:-1], ids[1:], trained[1:]))
        rewards = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(rewards.view(-1, self.generations)).flatten()
        sequences = collate(samples, self.tokenizer.pad_token_id)
        old_logp = None
        if self.iterations > 1:  # the policy moves between the steps that reuse these: keep today's log-probs
            device = next(model.parameters()).device
            with torch.no_grad(), autocast_context(self.args):
                on_device = sequences.to(device)
                old_logp = self.logprobs(model(on_device.input_ids, **on_device.model_inputs()).logits,
                                         on_device).cpu()
        return Rollouts(sequences, advantages, rewards, len(batch), time.perf_counter() - started, old_logp)

    def converse(self, model, prompt, chat, rows, sampling, generator=None):
        """`rows` rollouts of one prompt: [(token ids, 1 where the model wrote the token, the text to reward)].

        Without tools each row is one sampled answer (its eos kept), rewarded on its whole text. With tools, rows
        whose answer calls tools get the results and answer again; rows as long as each other so far decode
        together (all of them in the first round).
        """
        device, eos = next(model.parameters()).device, self.tokenizer.eos_token_id
        if self.tools:  # the prompt offers the run's tools when its line names none
            messages, tools = chat[0], chat[1] or self.tools.schemas
            prompt = torch.tensor(self.tokenizer(render_chat(self.tokenizer, messages, tools, add_generation_prompt=True),
                                                 add_special_tokens=False).input_ids[-self.args.max_seq_len:])
        rollouts = [_Rollout(prompt.tolist(), [0] * len(prompt)) for _ in range(rows)]
        for round_ in range(self.max_tool_calls + 1 if self.tools else 1):
            same_length = {}
            for rollout in rollouts:
                if not rollout.done:
                    same_length.setdefault(len(rollout.ids), []).append(rollout)
            for length, group in same_length.items():
                room = min(self.max_new_tokens, self.context - length)
                steps = list(stream_tokens(model, torch.tensor([r.ids for r in group], device=device), room,
                                           sampling, eos, generator)) if room > 0 else []
                answers = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(len(group), 0, dtype=torch.long)
                for rollout, answer in zip(group, answers):
                    ended = (answer == eos).nonzero()
                    answer = answer[: int(ended[0]) + 1] if len(ended) else answer  # keep its eos
                    rollout.ids += answer.tolist()
                    rollout.trained += [1] * len(answer)
                    text = self.tokenizer.decode(answer, skip_special_tokens=True)
                    if not self.tools:
                        rollout.done, rollout.text = True, text
                        continue
                    reply = read_reply(text)
                    rollout.text = reply["content"]
                    rollout.done = not (reply["tool_calls"] and len(ended)) or round_ == self.max_tool_calls
                    if not rollout.done:  # the results, framed as the template frames them: context, not trained
                        results = self.tools.results_ids(self.tokenizer, reply)
                        rollout.ids += results
                        rollout.trained += [0] * len(results)
        return [(r.ids, r.trained, r.text) for r in rollouts]

    def score(self, completion, answer, reward, index, path):
        """The reward of one completion; a reward function that fails is one line naming the prompt's line."""
        try:
            value = (self.custom_reward or REWARDS[reward or self.default_reward])(completion, answer)
        except Exception as err:
            what = f"raised {type(err).__name__}: {err}"
        else:
            try:  # a bool, a numpy or 0-dim torch number are numbers too; a string is not
                number = None if isinstance(value, (str, bytes)) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is not None and math.isfinite(number):
                return number
            what = f"returned {value!r}, not a finite number"
        raise UserError(f"{path}, line {line_number(path, index)}: the reward function {what} for this prompt's "
                        f"completion; fix the function or the line's \"answer\"")

    def logprobs(self, logits, batch):
        """[rows, width] log-probabilities of the sampled tokens under the distribution they were sampled from,
        softmax(logits / --temperature) (the policy's, the reference's and the reused rollouts' alike): at temperature
        1 the policy gradient of completions sampled at another one is biased, and the k3 KL estimate too."""
        temperature = self.sampling.temperature
        return token_logprobs(logits if temperature == 1 else logits / temperature, batch)

    def __call__(self, model, rollouts, step):
        batch = rollouts.sequences
        out = model(batch.input_ids, **batch.model_inputs())
        logp = self.logprobs(out.logits, batch)
        if self.beta > 0:
            with torch.no_grad():
                ref_logp = self.logprobs(self.reference(batch.input_ids, **batch.model_inputs()).logits, batch)
        else:
            ref_logp = logp.detach()
        old_logp = rollouts.old_logp if rollouts.old_logp is not None else logp.detach()
        loss, kl, clipped = grpo_loss(logp, old_logp, ref_logp, rollouts.advantages, batch.loss_mask,
                                      self.clip_eps, self.beta, step.units)
        step_rollouts = self.rollouts
        rows = sum(len(r.rewards) for r in step_rollouts) * step.processes
        groups = sum(r.groups for r in step_rollouts) * step.processes
        seconds = sum(r.seconds for r in step_rollouts)
        generated = sum(int(r.sequences.loss_mask.sum()) for r in step_rollouts)
        group_std = rollouts.rewards.view(-1, self.generations).std(dim=1)
        share = 1 / (step.micro_batches * step.processes)  # of a per-process step figure
        metrics = {
            "reward": rollouts.rewards.sum() / rows, "reward_std": group_std.sum() / groups,
            "correct": (rollouts.rewards >= 1).float().sum() / rows, "kl": kl.detach() / step.units,
            "completion_len": batch.loss_mask.sum() / rows, "clipped": clipped / step.units,
            "gen_s": torch.tensor(seconds * share),
            "gen_tok_s": torch.tensor(generated / max(seconds, 1e-9) * share),
        }
        loss = loss + moe_aux_share(out, step)
        return Loss(loss, batch.tokens, {name: value.to(loss.device).float() for name, value in metrics.items()})

    @torch.no_grad()
    def evaluate(self, model, dataset, args):
        """Held-out accuracy: the share of prompts whose greedy completion (conversation, with tools) gets a reward
        of at least 1."""
        greedy, correct, total = Sampling(), 0, 0
        for batch in eval_batches(model, dataset, args, args.val_samples):
            for prompt, answer, reward, index, chat in zip(batch.prompts, batch.answers, batch.rewards, batch.indices,
                                                           batch.chats):
                [(_, _, text)] = self.converse(model, prompt, chat, 1, greedy)
                correct += self.score(text, answer, reward, index, dataset.path) >= 1
                total += 1
        return {"accuracy": correct / max(total, 1)}


@dataclass
class _Rollout:
    ids: list  # prompt, answers and tool results so far
    trained: list  # 1 on the tokens the model wrote
    done: bool = False
    text: str = ""  # what the reward reads: the last answer
