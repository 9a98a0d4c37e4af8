"""Benchmark accuracy through lm-eval: any tinymind checkpoint as an lm-eval model (`3-eval.py --tasks ...`).

`TinyMindLM` is lm-eval's `TemplateLM` over tinymind's own model and decoder, so a task is tokenised exactly as
lm-eval's stock `hf` model tokenises it (the same base class splits context from continuation) and scored the same
way: a continuation's log-likelihood is the sum of its tokens' log-probabilities after the context, and it "is
greedy" when each of its tokens is the argmax. Requests are sorted longest first and scored a batch at a time,
one forward per batch (the choices of a multiple-choice question are requests of their own, so several questions'
choices share a forward). `generate_until` decodes greedily (or samples, when a task asks) with the KV cache and
stops at the task's stop strings or the end token.

Tasks are lm-eval's: its registry by name (they download their data from the Hugging Face Hub), or YAML files in
`--include_path` folders; tinymind's own held-out tasks live in `tasks/` and read the files `prepare_data` writes.
"""

import functools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

from dataset.chat import read_reply, render_chat
from model import Sampling, stream_tokens
from model.weights import atomic_write

from .distributed import say
from .errors import UserError
from .precision import autocast_context

OWN_TASKS = Path(__file__).resolve().parent.parent / "tasks"


class TinyMindLM(TemplateLM):
    """A tinymind model and its tokenizer as an lm-eval model."""

    def __init__(self, model, tokenizer, batch_size=8, dtype_args=None, max_length=None, tools=None, max_tool_calls=4):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.tools, self.max_tool_calls = tools, max_tool_calls  # offered in the chat template, run in generate_until
        # autocast_context reads these flags, generation 3-eval's --compile (compile_decode)
        self.dtype_args = dtype_args or SimpleNamespace(dtype="float32", device="cpu")
        self.max_length = max_length or model.config.max_position_embeddings
        self.backend = "causal"

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):  # what an empty context is scored after, as lm-eval's hf model does
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self):
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return render_chat(self.tokenizer, chat_history, self.tools.schemas if self.tools else None,
                           add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        """[(log-probability, is greedy)] of each request's continuation tokens after its context tokens."""
        rows = []  # (request index, input ids, continuation ids)
        for index, (_, context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((index, whole[:-1], continuation))
        rows.sort(key=lambda row: -len(row[1]))  # longest first: a batch pads little, and memory peaks first
        results = [None] * len(rows)
        batches = range(0, len(rows), self.batch_size)
        for start in tqdm(batches, desc="scoring", disable=disable_tqdm or len(batches) < 2):
            batch = rows[start:start + self.batch_size]
            width = len(batch[0][1])
            # Right padding: a causal model's earlier positions never see the pad after them.
            inputs = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, (_, ids, _) in enumerate(batch):
                inputs[row, :len(ids)] = torch.tensor(ids)
            with autocast_context(self.dtype_args):
                logits = self.model(inputs.to(self.device)).logits
            for row, (index, ids, continuation) in enumerate(batch):
                # Only the continuation's positions go to float32 log-probabilities, not the whole vocabulary
                # of every position.
                positions = logits[row, len(ids) - len(continuation):len(ids)].float()
                logprobs = F.log_softmax(positions, dim=-1)
                wanted = torch.tensor(continuation, device=logprobs.device)
                answer = (float(logprobs.gather(1, wanted[:, None]).sum()),
                          bool((logprobs.argmax(dim=-1) == wanted).all()))
                results[index] = answer
                self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each text's whole log-likelihood, in windows of the model's length, each window scored once."""
        scores = []
        for request in tqdm(requests, desc="rolling log-likelihood", disable=disable_tqdm):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            parts = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows],
                                               disable_tqdm=True)
            total = sum(logprob for logprob, _ in parts)
            scores.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return scores

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Each context's continuation, decoded until a stop string of the task or the end token. With tools, the
        model's calls run and it answers again (up to `max_tool_calls` rounds); the stop strings cut its last answer."""
        answers = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(options.get("max_gen_toks", 256))
            sampling = Sampling(float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0,
                                int(options.get("top_k", 0) or 0), float(options.get("top_p", 1.0) or 1.0),
                                float(options.get("repetition_penalty", 1.0)))
            ids = self.tok_encode(context, left_truncate_len=max(self.max_length - new_tokens, 1))
            for round_ in range(self.max_tool_calls + 1 if self.tools else 1):
                tokens, text, ended = self.reply(ids, new_tokens, sampling, [] if self.tools else until)
                if not self.tools:
                    break
                reply = read_reply(text)
                text = reply["content"]
                if not (reply["tool_calls"] and ended) or round_ == self.max_tool_calls:
                    break
                ids = ids + tokens + [self.eot_token_id] + self.tools.results_ids(self.tokenizer, reply)
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return answers

    def reply(self, ids, new_tokens, sampling, until):
        """(tokens, text, whether it ended with the end token) of one reply after `ids`, cut at a stop string."""
        tokens, text = [], ""
        with autocast_context(self.dtype_args):
            for token in stream_tokens(self.model, torch.tensor([ids], device=self.device), new_tokens, sampling,
                                       self.eot_token_id, compile=getattr(self.dtype_args, "compile_decode", False)):
                if int(token) == self.eot_token_id:
                    return tokens, text, True
                tokens.append(int(token))
                text = self.tok_decode(tokens)
                if any(stop in text for stop in until):
                    break
        return tokens, text, False


def run_benchmarks(model, tokenizer, args, checkpoint, tools=None):
    """Score `model` on `args.tasks` with lm-eval, print its table and write its results JSON."""
    manager, tasks = resolve_tasks(args.tasks, args.include_path)
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    lm = TinyMindLM(model, tokenizer, args.batch_size, args, tools=tools, max_tool_calls=args.max_tool_calls)
    results = simple_evaluate(model=lm, tasks=tasks,
                              num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
                              apply_chat_template=args.chat_template, log_samples=False,
                              random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    scores = centred_scores(results)
    if scores:
        results["tinymind"] = {"centred": {task: centred for task, (_, centred) in scores.items()},
                               "headline": sum(centred for _, centred in scores.values()) / len(scores)}
        print("accuracy centred on chance (0: chance, 1: all right): " + ", ".join(
            f"{task} {centred:+.3f}" for task, (_, centred) in scores.items()))
        print(f"headline (their mean): {results['tinymind']['headline']:+.3f}")
    path = Path(args.results or Path(checkpoint).with_name(f"{Path(checkpoint).stem}_lm_eval.json"))
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str)))
    say(f"lm-eval results: {path}", err=True)
    return results


def centred_scores(results):
    """{task: (accuracy, accuracy centred on chance)} for the tasks whose YAML gives `metadata: chance`:
    (accuracy − chance) / (1 − chance), 0 at chance and 1 when every answer is right, as nanochat centres CORE."""
    scores = {}
    for task, accuracy in accuracies(results).items():
        chance = (results.get("configs", {}).get(task, {}).get("metadata") or {}).get("chance")
        if chance is not None:
            scores[task] = (accuracy, (accuracy - chance) / (1 - chance))
    return scores


def accuracies(results):
    """{task: its accuracy (acc, else exact_match)} from lm-eval's results."""
    found = {}
    for task, metrics in results["results"].items():
        for name in ("acc", "exact_match"):
            value = next((v for key, v in metrics.items() if key.split(",")[0] == name and isinstance(v, float)), None)
            if value is not None:
                found[task] = value
                break
    return found


@functools.cache
def task_manager(include_path=None):
    """lm-eval's index of its registry, tinymind's tasks/ and `include_path` (built once each: it reads every
    task's YAML)."""
    return TaskManager(include_path=[str(OWN_TASKS)] + ([include_path] if include_path else []))


def resolve_tasks(names, include_path=None, flag="--tasks"):
    """(TaskManager, task names) for comma-separated `names`: lm-eval's registry, tinymind's tasks/ and
    `include_path`; a tag stands for its tasks; a name none of them holds is one UserError."""
    manager = task_manager(include_path)
    tasks = []
    for name in (name.strip() for name in names.split(",") if name.strip()):
        entry = manager.task_index.get(name)
        if entry is None:
            raise UserError(f"{flag}: no task named {name} (lm-eval's registry, tinymind's tasks/ and --include_path "
                            f"hold {len(manager.all_tasks)} tasks; `lm-eval ls tasks` lists them)")
        tasks += sorted(entry.tags) if name in manager.all_tags else [name]
    return manager, list(dict.fromkeys(tasks))


def task_accuracies(model, tokenizer, tasks, args):
    """{task: accuracy} of `model` on lm-eval `tasks` (at most `args.eval_limit` examples each), quietly: the
    held-out figures a training run logs with --eval_tasks."""
    manager, _ = resolve_tasks(",".join(tasks), flag="--eval_tasks")
    lm = TinyMindLM(model, tokenizer, args.batch_size, args)
    # lm-eval seeds Python's, numpy's and torch's generators: the run's own streams (dropout) go on as they were
    python_state, numpy_state = random.getstate(), np.random.get_state()
    device = torch.device(args.device)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            results = simple_evaluate(model=lm, tasks=list(tasks), limit=args.eval_limit, task_manager=manager,
                                      log_samples=False, verbosity="ERROR", random_seed=args.seed,
                                      numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                      fewshot_random_seed=args.seed)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return accuracies(results)
