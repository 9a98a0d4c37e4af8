"""Continuous batching: one thread decodes every active request together, one token for each per step.

A request waits in a queue until a cache row (a slot) is free, is prefilled alone into that row,
and from the next step on decodes in the shared batch (`Decoder.decode`: every row at its
own position; on CUDA `Decoder.step`, every slot at fixed shapes, replayed as a CUDA graph).
A request that finishes (end token, its token budget, the context) or is cancelled leaves at once
and frees its row for the next. A step reads every weight once whatever
the batch, so on a machine bound by weight reads, many requests decode for little more than one.

The engine speaks token ids; detokenizing, stop strings and the HTTP side are the server's.
"""

import contextlib
import heapq
import threading
from collections import deque
from dataclasses import astuple, dataclass
from typing import Callable

import torch

from .generate import Decoder, Sampling, next_tokens


@dataclass(eq=False)  # a request is itself, not its fields: two alike requests are two (the queue removes by it)
class Request:
    prompt: list  # token ids
    max_tokens: int
    sampling: Sampling
    # Called on the engine's thread (or cancel's, for a request cancelled while it waits): emit(token, None) for
    # each new token, then emit(None, finish reason), the reason being "stop" (end token), "length" (max_tokens
    # or the context), "cancelled" or "error: ...".
    emit: Callable
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_tokens
    cancelled: bool = False


@dataclass
class _Running:
    request: Request
    seen: torch.Tensor  # [1, n] ids so far, for the repetition penalty
    position: int  # tokens in this slot's cache once `last` is written: `last` goes at position - 1
    generated: int = 0
    generator: torch.Generator | None = None
    last: torch.Tensor | None = None  # the token decoded last, the next step's input


class Engine:
    def __init__(self, model, eos_token_id, max_batch=8, max_queue=16, context=2048, graphs=None):
        """`context`: the longest prompt + completion a request may have (each slot's cache holds that many).
        `graphs`: decode through the compiled fixed-shape step (a CUDA graph on CUDA; default: on CUDA only, as
        on a CPU it measured slower than the eager decoder: scripts/gpu_check.py's engine rows)."""
        if max_batch < 1:  # no slot would ever free: requests would wait forever while the thread spins
            raise ValueError(f"max_batch {max_batch}: an engine needs at least 1 slot")
        self.model, self.eos = model.eval(), eos_token_id
        self.max_len = min(context, model.config.max_position_embeddings)
        self.slots = max_batch
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.decoder = None  # built on the engine's thread at the first request
        self.free = list(range(max_batch))  # a heap: the lowest free row first, so running rows tend to stay consecutive
        self.running = {}  # slot → _Running
        self.waiting = deque()
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, request) -> bool:
        """Queue `request`; False when every slot is busy and the queue is full, or the engine is closed. Requests
        not yet admitted count against the free slots first: a burst the engine's thread has not yet taken in
        cannot overfill the queue."""
        with self.condition:
            if self.closed or len(self.waiting) >= len(self.free) + self.max_queue:
                return False
            self.waiting.append(request)
            self.condition.notify()
        return True

    def cancel(self, request):
        """Stop `request` before its next step (a client that went away, a stop string); one still waiting leaves
        the queue at once, its place free for the next."""
        request.cancelled = True
        with self.condition:
            if request in self.waiting:
                self.waiting.remove(request)
                request.emit(None, "cancelled")
            self.condition.notify()

    def close(self):
        """Stop the engine: the requests still waiting or running end as "cancelled", its thread exits and the
        decoder's cache is freed."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()

    @property
    def load(self):
        with self.condition:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.slots}

    def _loop(self):
        with torch.no_grad():
            while True:
                with self.condition:
                    while not self.running and not self.waiting and not self.closed:
                        self.condition.wait()
                    if self.closed:
                        break
                    admitted = []
                    while self.free and self.waiting:
                        request = self.waiting.popleft()
                        if request.cancelled:  # gone while it waited: it never takes a slot
                            request.emit(None, "cancelled")
                        else:
                            admitted.append((heapq.heappop(self.free), request))
                for slot, request in admitted:
                    self._guarded(slot, request, self._prefill)
                try:
                    self._step()
                except Exception as err:  # a failure outside any one request's work (on CUDA, an asynchronous
                    for slot in list(self.running):  # device error surfaces at the step's one read): the step's
                        with contextlib.suppress(Exception):  # requests end with it and the engine serves on
                            self._finish(slot, failure(err))
        for request in [*self.waiting, *(state.request for state in self.running.values())]:
            with contextlib.suppress(Exception):  # one failing callback must not keep the others waiting
                request.emit(None, "cancelled")
        self.waiting.clear()
        self.running.clear()
        self.decoder = None

    def _guarded(self, slot, request, work):
        try:
            work(slot, request)
        except Exception as err:  # one bad request must not stop the engine
            self._finish(slot, failure(err))

    def _prefill(self, slot, request):
        state = _Running(request, None, len(request.prompt))
        self.running[slot] = state  # first, so that any failure below frees the slot through _finish
        if self.decoder is None:
            self.decoder = Decoder(self.model, self.slots, self.max_len)
        state.seen = torch.tensor([request.prompt], device=self.device)
        if request.seed is not None:
            state.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        logits = self.decoder(state.seen, 0, rows=slice(slot, slot + 1))
        token = next_tokens(logits, state.seen, request.sampling, state.generator)
        self._advance(slot, state, token, int(token))

    def _step(self):
        for slot, state in list(self.running.items()):
            if state.request.cancelled:
                self._finish(slot, "cancelled")
        if not self.running:
            return
        slots = sorted(self.running)
        tokens = torch.cat([self.running[slot].last for slot in slots])
        positions = [self.running[slot].position - 1 for slot in slots]
        try:
            logits = self._decode(slots, tokens, positions)
        except Exception as err:
            for slot in slots:
                self._finish(slot, failure(err))
            return
        states = [self.running[slot] for slot in slots]
        tokens, errors = self._sample(logits, states)
        values = tokens.view(-1).tolist()  # one transfer
        for slot, state, token, value, error in zip(slots, states, tokens, values, errors):
            if error is not None:
                self._finish(slot, failure(error))
                continue
            self._guarded(slot, state.request,
                          lambda slot, request, state=state, token=token, value=value: self._advance(
                              slot, state, token[None], value))

    def _decode(self, slots, tokens, positions):
        """[len(slots), vocab] logits of the slots' next tokens. With graphs every slot decodes (the idle ones
        a token at position 0, which their next prefill overwrites) and the running ones' rows are kept."""
        if not self.graphs:
            return self.decoder.decode(slots, tokens, positions)
        index = torch.tensor(slots, device=self.device)
        every_token = torch.zeros(self.slots, dtype=tokens.dtype, device=self.device).index_copy(0, index, tokens)
        every_position = [0] * self.slots
        for slot, position in zip(slots, positions):
            every_position[slot] = position
        logits = self.decoder.compiled_step(every_token, torch.tensor(every_position, device=self.device),
                                            cuda_graph=True)
        if logits is None:  # it failed to compile (or capture), and said so: decode as on a CPU from now on
            self.graphs = False
            return self.decoder.decode(slots, tokens, positions)
        return logits[index]

    @classmethod
    def _sample(cls, logits, states):
        """([rows, 1] next tokens for a step's rows, each by its request's sampling, and for each row the error
        its sampling raised or None): the rows that share their settings (and no seeded generator of their own)
        in one call. A call that fails is made again row by row, so that one request's failure (a NaN in its
        logits) ends that request alone."""
        tokens = torch.empty(len(states), 1, dtype=torch.long, device=logits.device)
        errors = [None] * len(states)
        groups = {}
        for row, state in enumerate(states):
            key = (astuple(state.request.sampling), id(state.generator) if state.generator is not None else None)
            groups.setdefault(key, []).append(row)
        calls = list(groups.values())
        for rows in calls:  # the list grows by the rows of a call that failed, each alone
            try:
                cls._sample_rows(logits, states, rows, tokens)
            except Exception as err:
                if len(rows) == 1:
                    errors[rows[0]] = err
                else:
                    calls += [[row] for row in rows]
        return tokens, errors

    @staticmethod
    def _sample_rows(logits, states, rows, tokens):
        """Sample rows `rows` (of one sampling) into `tokens` in one call, their `seen` ids padded with a repeat
        of their own last id (which the repetition penalty treats the same)."""
        seen = [states[row].seen[0] for row in rows]
        width = max(len(ids) for ids in seen)
        padded = torch.stack([torch.cat([ids, ids[-1:].expand(width - len(ids))]) for ids in seen])
        first = states[rows[0]]
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = next_tokens(logits[index], padded, first.request.sampling, first.generator)

    def _advance(self, slot, state, token, value):
        """Hand over the request's next token (`token` [1, 1], `value` its id) and finish the request if it is
        done."""
        request = state.request
        state.seen = torch.cat([state.seen, token], dim=1)
        state.last, state.position, state.generated = token[0], state.position + 1, state.generated + 1
        if value == self.eos and not request.ignore_eos:
            self._finish(slot, "stop")
            return
        request.emit(value, None)
        if state.generated >= request.max_tokens or state.position >= self.max_len:
            self._finish(slot, "length")

    def _finish(self, slot, reason):
        state = self.running.pop(slot, None)
        if state is None:
            return
        with self.condition:
            heapq.heappush(self.free, slot)
        state.request.emit(None, reason)


def failure(err):
    """The finish reason of a request that `err` ended."""
    return f"error: {type(err).__name__}: {err}"
