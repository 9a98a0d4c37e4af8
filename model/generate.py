"""Fast decoding: the `Decoder` that runs the network for inference, sampling, and the token stream.

`3-eval.py` chats through `stream_tokens`, and `model.fast_generate` is the same loop collected
into a tensor. At batch 1 a decode step is some sixty small matmuls and a few hundred tiny ops;
on a CPU their per-call cost rivals the arithmetic, so the decoder runs the model's weights through plain
function calls, skipping the modules' calls and the training forward's bookkeeping. tests/test_fast_paths.py
holds it to the modules' logits and to Hugging Face `generate`.
"""

import traceback
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import MoEFeedForward, attend, gated, rms_norm, softcap


# Dividing logits by a tinier temperature overflows them to inf, and softmax makes that NaN (vLLM draws the line here).
GREEDY_BELOW = 1e-5
LEAST_REPETITION_PENALTY = 0.01  # a tinier penalty overflows the logits it divides


@dataclass
class Sampling:
    """How the next token is chosen, in Hugging Face `generate`'s order: repetition penalty, temperature,
    top-k, top-p. A temperature below `GREEDY_BELOW` is greedy (the penalty still applies)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def next_tokens(logits, seen, sampling, generator=None):
    """[batch, 1] next tokens from float [batch, vocab] logits; `seen` [batch, n] are the ids so far."""
    if sampling.repetition_penalty != 1.0:
        previous = logits.gather(1, seen)
        penalised = torch.where(previous < 0, previous * sampling.repetition_penalty,
                                previous / sampling.repetition_penalty)
        logits = logits.scatter(1, seen, penalised)
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth_best = logits.topk(min(sampling.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest set of best tokens whose probability reaches top_p (the best one always).
        drop_sorted = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def stream_tokens(model, input_ids, max_new_tokens, sampling=Sampling(), eos_token_id=None, generator=None,
                  compile=False):
    """Yield [batch] tensors of new tokens, one per step, after unpadded prompts `input_ids`.

    A row that produced `eos_token_id` yields `pad_token_id` from then on; the stream ends when
    every row has finished or after `max_new_tokens` steps. `compile`: decode through the compiled step
    (`Decoder.compiled_step`; the first call of a process compiles, for some seconds).
    """
    batch, prompt_len = input_ids.shape
    decoder = decoder_for(model, batch, prompt_len + max_new_tokens)
    seen, step_input, start = input_ids, input_ids, 0
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = None
        if compile and start:
            logits = decoder.compiled_step(step_input[:, 0], torch.full_like(step_input[:, 0], start), cuda_graph=True)
        if logits is None:
            logits = decoder(step_input, start)
        start += step_input.size(1)
        step_input = next_tokens(logits, seen, sampling, generator)
        if eos_token_id is not None:
            step_input = step_input.masked_fill(finished[:, None], model.config.pad_token_id or 0)
            finished |= step_input[:, 0] == eos_token_id
        seen = torch.cat([seen, step_input], dim=1)
        yield step_input[:, 0]
        if eos_token_id is not None and bool(finished.all()):
            return


def fast_generate(model, input_ids, max_new_tokens, sampling=Sampling(), eos_token_id=None, generator=None,
                  compile=False):
    """Like `generate` for unpadded prompts: the prompt followed by the new tokens."""
    steps = list(stream_tokens(model, input_ids, max_new_tokens, sampling, eos_token_id, generator, compile))
    return torch.cat([input_ids, *(token[:, None] for token in steps)], dim=1)


# The decoder each model's last token stream ran (`decoder_for`), dropped with the model.
DECODERS = weakref.WeakKeyDictionary()
CACHE_STEP = 256  # the streams' cache lengths are rounded up to a multiple of this: few shapes to compile


def decoder_for(model, batch, length):
    """The model's decoder for `batch` rows of up to `length` positions: the one its last stream ran if that has
    this batch, cache length (`length` rounded up to CACHE_STEP, within the model's positions where they allow),
    dtype and parameters, any weights it copies (`Decoder.weights`) made anew, in place once
    a CUDA graph reads them (the model may have been trained since: fused optimizers change weights without
    marking them changed), so a compiled step, and on CUDA its captured graph, serve every later stream; else a
    new one."""
    length = max(length, min(CACHE_STEP * -(-length // CACHE_STEP), model.config.max_position_embeddings))
    decoder = DECODERS.get(model)
    shape = (batch, length, Decoder.compute_dtype(model), [moe.dispatch for moe in model.moe_layers()])
    if decoder is None or (decoder.shape, decoder.addresses) != (shape, weight_addresses(model)):
        decoder = DECODERS[model] = Decoder(model, batch, length)
        return decoder
    decoder.refresh(model)  # its cache needs no clearing: a prefill clears its rows past the prompt
    return decoder


def weight_addresses(model):
    return [p.data_ptr() for p in model.parameters()]


def tensors_in(structure):
    """The tensors of nested tuples and lists, in order (modules, functions and None left out)."""
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, (tuple, list)):
        for item in structure:
            yield from tensors_in(item)


class Decoder:
    """The network as the token stream runs it: inference only, built from the model once and reused while the
    stream's shape holds (`decoder_for`), the server's engine for its life.

    It runs the model's own pieces (model.py's norm, the attention's q/k norm and rotary, the attention core,
    the feed-forward activation, the MoE router) in the block's order, so it computes exactly what the modules
    compute, over the modules' own weight tensors (copies only where it computes in another dtype, under
    autocast, or a LoRA adapter is merged into them; made again for each stream it serves), with: rotary angles
    looked up from a table, keys and values written into a preallocated cache (a sequence's attention over its
    filled part needs no mask; rows of different lengths and the fixed-shape `step` use one), the norms called
    as functions rather than modules, and none of the forward's position bookkeeping, dropout or aux loss.
    """

    def __init__(self, model, batch, max_len):
        self.config = config = model.config
        body = model.model
        device = body.embed_tokens.weight.device
        self.dtype = self.compute_dtype(model)
        # what `decoder_for` reuses it for: rows, cache length, dtype and the MoE layers' dispatch (what it stacks)
        self.shape = (batch, max_len, self.dtype, [moe.dispatch for moe in model.moe_layers()])
        self.body, self.embed_tokens, self.norm = body, body.embed_tokens, body.norm
        self.blocks, self.head, self.stacked = self.weights(model, self.dtype)
        self.addresses = weight_addresses(model)  # what its weights were taken from
        positions = torch.arange(max_len, device=device)[None]
        # [1, 1, max_len, head_dim] in the embedding's dtype, as the modules' forward makes them
        self.cos, self.sin = body.rotary(positions, body.embed_tokens.weight.dtype)
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        # A tensor per layer, not one tensor for all: the compiled step writes into each in place, where a write
        # into one layer's view of a shared tensor compiles into copies of that layer's whole cache.
        # Zeros, not empty: a masked-out place still enters attention's sums times zero, and uninitialised memory
        # may hold NaN, which times zero is NaN (rows shorter than the longest, the fixed-shape step's whole cache).
        self.keys = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in body.layers]
        self.values = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in body.layers]
        self.places, self.rows = torch.arange(max_len, device=device), torch.arange(batch, device=device)
        self.compiled = None  # the compiled step once made (`compiled_step`), False if compiling it failed
        self.static = False  # whether a CUDA graph reads its tensors where they are (`compiled_step`)

    @staticmethod
    def compute_dtype(model):
        """The dtype it computes in: under autocast the autocast dtype (its weights are cast once, where autocast
        would cast them again on every step), else the weights'."""
        weight = model.model.embed_tokens.weight
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

    @classmethod
    def weights(cls, model, dtype):
        """(each block's weights (`block_weights`), the head's weight, and for a MoE layer that runs the grouped
        dispatch (on CUDA in bf16; see MoEFeedForward.grouped) its experts' weights stacked once here rather than
        on every step, else None)."""
        blocks = [cls.block_weights(block, dtype) for block in model.model.layers]
        head = weight_of(model.lm_head).to(dtype)
        stacked = [moe.stacked_experts(moe.grouped_dtype(head)) if moe is not None and moe.grouped(head) else None
                   for *_, moe, _ in blocks]
        return blocks, head, stacked

    def refresh(self, model):
        """The weights taken again from the model's present ones; once a CUDA graph reads them where they are
        (`static`), copied into this decoder's own (those that are the model's parameters need nothing)."""
        fresh = self.weights(model, self.dtype)
        if not self.static:
            self.blocks, self.head, self.stacked = fresh
            return
        for old, new in zip(tensors_in((self.blocks, self.head, self.stacked)), tensors_in(fresh)):
            if old is not new:
                old.copy_(new)

    @staticmethod
    def block_weights(block, dtype):
        """(first norm's weight, the attention module (its q/k norm + rotary and value-embedding gate), q, k and
        v, o, second norm's weight, the MoE module or None, the feed-forward's gate, up and down, or for a MoE
        ([experts'], [shared experts'])): the modules' own weights, copies only in another dtype or with a LoRA
        adapter merged in."""
        def cast(weight):
            return weight.to(dtype)

        def ffn_weights(ffn):
            return (*(cast(weight_of(linear)) for linear in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)), ffn.act)

        attn, mlp = block.self_attn, block.mlp
        qkv = tuple(cast(weight_of(linear)) for linear in (attn.q_proj, attn.k_proj, attn.v_proj))
        moe = mlp if isinstance(mlp, MoEFeedForward) else None
        if moe is not None:
            ffn = ([ffn_weights(expert) for expert in mlp.experts], [ffn_weights(shared) for shared in mlp.shared_experts])
        else:
            ffn = ffn_weights(mlp)
        return (block.input_layernorm.weight, attn, qkv, cast(weight_of(attn.o_proj)),
                block.post_attention_layernorm.weight, moe, ffn)

    def __call__(self, input_ids, start, rows=slice(None)):
        """Logits of the last position of `input_ids`, which sit at positions start, start+1, ... of the cache
        rows `rows` (all by default): a prompt, then one token at a time."""
        seq = input_ids.size(1)
        end = start + seq
        assert start == 0 or seq == 1, "a prompt, then one token at a time"

        def cached_attention(i, q, k, v):
            self.keys[i][rows, :, start:end], self.values[i][rows, :, start:end] = k, v
            if start == 0:  # a new sequence in these rows: clear what an earlier one left after it, which the
                # batched steps read masked, times zero (a NaN or inf there would poison every later request)
                self.keys[i][rows, :, end:], self.values[i][rows, :, end:] = 0, 0
            return attend(q, self.keys[i][rows, :, :end], self.values[i][rows, :, :end], causal=seq > 1)

        return self.run(input_ids, self.cos[:, :, start:end], self.sin[:, :, start:end], cached_attention)

    def decode(self, rows, tokens, positions):
        """[len(rows), vocab] logits of one new token for each cache row in `rows` (a list of ints), each at its
        own position (`positions`, a list): sequences of different lengths decode together (continuous batching)."""
        device = tokens.device
        length, index = max(positions) + 1, torch.tensor(rows, device=device)
        at = torch.tensor(positions, device=device)
        # Consecutive rows are read as a view of the cache; any others are gathered (a copy) in every layer.
        read = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else index
        # Rows at one position see all `length` cached keys: no mask (the same numbers, without its cost).
        mask = None if min(positions) == length - 1 else (torch.arange(length, device=device) <= at[:, None])[:, None, None]

        def cached_attention(i, q, k, v):
            self.keys[i][index, :, at], self.values[i][index, :, at] = k[:, :, 0], v[:, :, 0]
            return attend(q, self.keys[i][read, :, :length], self.values[i][read, :, :length], mask)

        cos, sin = self.cos[0, 0, at][:, None, None], self.sin[0, 0, at][:, None, None]
        return self.run(tokens[:, None], cos, sin, cached_attention)

    def step(self, tokens, positions):
        """[batch, vocab] logits of one new token for every cache row, `tokens` and `positions` ([batch] tensors
        on the device) giving each row's input and place: `decode` with fixed shapes and no host read. Attention
        reads the whole cache under a mask and a MoE routes through its module (grouped dispatch on CUDA), so the
        step is one graph whatever the positions: it compiles once, and on CUDA replays as a CUDA graph
        (`compiled_step`). A row with nothing to decode may pass any token at position 0."""
        mask = (self.places <= positions[:, None])[:, None, None]
        batch, heads, kv_heads = tokens.size(0), self.config.num_attention_heads, self.config.num_key_value_heads

        def cached_attention(i, q, k, v):
            self.keys[i][self.rows, :, positions], self.values[i][self.rows, :, positions] = k[:, :, 0], v[:, :, 0]
            # One query per row: the query heads that share a key/value head become that head's query positions,
            # so attention needs no grouped-query support (on CUDA, SDPA takes a mask with GQA only in its slow
            # math kernel) and every query reads the same mask row.
            grouped = q.reshape(batch, kv_heads, heads // kv_heads, -1)
            return attend(grouped, self.keys[i], self.values[i], mask).reshape(q.shape)

        cos, sin = self.cos[0, 0, positions][:, None, None], self.sin[0, 0, positions][:, None, None]
        return self.run(tokens[:, None], cos, sin, cached_attention, host_routing=False)

    def compiled_step(self, tokens, positions, cuda_graph=False):
        """`step` through torch.compile as one graph, or None once it has failed (the caller then decodes
        eagerly). With `cuda_graph` on CUDA (the engine: one decoder for the life of the server) in
        `reduce-overhead` mode, which captures the step as a CUDA graph and replays it (one launch per token
        instead of hundreds), with every tensor it reads or writes (the cache, the weights, the rotary
        tables) marked as a static address, so a replay copies none of them (the engine's decoder lives as long
        as the server, a stream's is reused by `decoder_for`); else fused kernels alone. On a CPU with a C++
        wrapper (`cpp_wrapper`: no Python between its kernels). Decoders of one shape share the compiled code;
        without a CUDA graph, after a second cache length the length is dynamic.

        A MoE compiles whole only with the grouped dispatch (MoEFeedForward.grouped; the default on CUDA in
        bf16), which runs its experts in bf16. Any failure, compiling, capturing (a CUDA graph is captured at
        the second call) or running: one warning, and None from then on."""
        if self.compiled is None:
            if any(moe is not None and not moe.grouped(self.head) for *_, moe, _ in self.blocks):
                warnings.warn("the compiled decode step needs a MoE's grouped dispatch (the default on a CUDA GPU "
                              "in bf16); this MoE decodes eagerly")
                self.compiled = False
            elif cuda_graph and self.head.is_cuda:
                tensors = [*self.keys, *self.values, self.head, self.cos, self.sin, self.places, self.rows,
                           *(weight for stacked in self.stacked if stacked is not None for weight in stacked)]
                for norm_1, _, qkv, o_proj, norm_2, moe, ffn in self.blocks:  # a MoE layer runs on its module's
                    tensors += [norm_1, *qkv, o_proj, norm_2, *(ffn[:3] if moe is None else ())]  # weights
                for tensor in tensors:
                    torch._dynamo.mark_static_address(tensor)
                self.static = True
                # Static shapes: a CUDA graph replays one shape anyway, and a second engine of another size then
                # compiles its own graph rather than one over a dynamic cache length.
                self.compiled = torch.compile(Decoder.step, fullgraph=True, dynamic=False, mode="reduce-overhead")
            else:
                options = {} if self.head.is_cuda else {"cpp_wrapper": True}
                self.compiled = torch.compile(Decoder.step, fullgraph=True, options=options)
        if self.compiled is False:
            return None
        try:
            # The function, not the bound method: a decoder holding its own bound method would be a reference
            # cycle, its cache freed only by the cycle collector.
            return self.compiled(self, tokens, positions)
        except Exception as err:
            where = traceback.extract_tb(err.__traceback__)[-1]
            warnings.warn(f"the compiled decode step failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]} "
                          f"at {where.filename}:{where.lineno}); decoding goes on eagerly")
            self.compiled = False
            return None

    def run(self, input_ids, cos, sin, cached_attention, host_routing=True):
        """The blocks' forward (model.Block) over the decoder's weights; `cached_attention(layer, q, k, v)` writes
        the new keys and values into the cache and attends over it. `host_routing`: a single token's MoE runs
        only its k experts, read back to the host (fastest eagerly); otherwise MoE layers route in their module."""
        c = self.config
        batch, seq = input_ids.shape
        x = self.embed_tokens(input_ids)
        eps, head_dim = c.rms_norm_eps, c.head_dim
        for i, (norm_1, attn, qkv, o_proj, norm_2, moe, ffn) in enumerate(self.blocks):
            h = rms_norm(x, norm_1, eps)
            q, k, v = (F.linear(h, weight).view(batch, seq, -1, head_dim).transpose(1, 2) for weight in qkv)
            value_embed = self.body.value_embed(i, input_ids)
            if value_embed is not None:
                v = attn.add_value_embed(v, h, value_embed)
            y = cached_attention(i, *attn.position(q, k, cos, sin), v)
            x = x + F.linear(y.transpose(1, 2).reshape(batch, seq, -1), o_proj)
            h = rms_norm(x, norm_2, eps)
            x = x + (feed_forward(h, *ffn) if moe is None else self.moe(moe, ffn, h, host_routing, self.stacked[i]))
        return softcap(F.linear(rms_norm(x[:, -1], self.norm.weight, eps), self.head), c.logit_softcap).float()

    @staticmethod
    def moe(moe, expert_weights, h, host_routing=True, stacked=None):
        """One token: run only its k experts. A prompt (several tokens) goes through the module's dispatch (over the
        experts' `stacked` weights where the decoder stacked them)."""
        if h.shape[0] * h.shape[1] > 1 or not host_routing:
            return moe(h, h.new_ones(h.shape[:2]), stacked)[0]
        experts, shared = expert_weights
        _, weights, chosen = moe.route(h.view(1, -1))
        out = sum(feed_forward(h, *expert) for expert in shared) if shared else torch.zeros_like(h)
        for weight, index in zip(weights.view(-1).tolist(), chosen.view(-1).tolist()):
            out = out + weight * feed_forward(h, *experts[index])
        return out


def weight_of(linear):
    """The weight a linear layer computes with: a peft LoRA layer (an unmerged adapter) adds its active
    adapters' low-rank updates to its frozen base weight; the module itself is left as it is."""
    if hasattr(linear, "get_delta_weight"):
        return linear.base_layer.weight + sum(linear.get_delta_weight(name) for name in linear.active_adapters)
    return linear.weight


def feed_forward(x, gate, up, down, act):
    """model.FeedForward over its weights."""
    return F.linear(gated(F.linear(x, gate), F.linear(x, up), act), down)
