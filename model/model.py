"""The TinyMind network, top to bottom: norm, rotary, attention, feed-forward, MoE, block, model.

A Llama-style decoder: token embedding → N pre-norm blocks (RMSNorm → grouped-query
attention with rotary positions → RMSNorm → SwiGLU or Mixture-of-Experts) → RMSNorm →
LM head tied to the embedding. Module names match the state-dict layout in DESIGN.md,
so `state_dict()` is exactly that layout and MiniMind2-layout `.pth` files load strictly.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import TinyMindConfig


def masked_cross_entropy(logits, targets, loss_mask, num_tokens=None):
    """Mean next-token cross-entropy over the positions where `loss_mask` is 1.

    `reduction="none"` keeps one loss per position so the mask really removes padding and
    prompt tokens (a default `reduction="mean"` would average them in). The sum is divided
    by `num_tokens` when given (the trainer passes the trained-token count of a whole
    optimizer step, so accumulated micro-batches add up to one large batch), else by the
    mask's own sum. A mask of all zeros gives 0, not NaN.
    """
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).to(per_token.dtype)
    denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
    return (per_token * mask).sum() / denominator.clamp(min=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even under bf16 autocast: the mean of squares loses too much in 8 bits.
        normed = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        # Under autocast only matmuls read the output: hand it over in their dtype, cast once here
        # rather than in each of the q/k/v (or gate/up) linears, forward and backward.
        if torch.is_autocast_enabled(x.device.type):
            return normed.to(torch.get_autocast_dtype(x.device.type))
        return normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions asked for, in the Hugging Face Llama (rotate-half) convention."""

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.dim = config.head_dim
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self):
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def forward(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [batch, 1, seq, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: `num_key_value_heads` K/V heads shared by groups of query heads."""

    def __init__(self, config: TinyMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask, past_key_values):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            # Without a mask the only case left is a fresh causal prefix, where SDPA's causal kernel is fastest.
            is_causal=attn_mask is None and seq > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Softmax router over `n_routed_experts` SwiGLU experts, top-k per token, plus always-on shared experts.

    Dispatch is one path for training and inference: sort the token→expert assignments by
    expert, run every expert once on its contiguous slice (an empty slice still runs, so an
    expert that got no token has a zero gradient rather than none, and DDP never waits on
    it), weight, and add back per token with `index_add_`.
    """

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.gate = nn.Linear(config.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        # Share of the last training forward's assignments that each expert received; the trainer logs it.
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)

    def forward(self, x, token_mask):
        """x: [batch, seq, hidden]; token_mask: [batch, seq], 1 for real tokens. Returns (output, aux_loss)."""
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        if torch.is_autocast_enabled(x.device.type):
            # Cast once here rather than in every expert's linears (each token meets k + n_shared of them).
            flat = flat.to(torch.get_autocast_dtype(x.device.type))
        scores = self.gate(flat).float().softmax(dim=-1)  # [tokens, experts]
        weights, experts = scores.topk(self.top_k, dim=-1)  # [tokens, k]
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        assigned_expert = experts.reshape(-1)
        order = assigned_expert.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(assigned_expert, minlength=self.n_experts).tolist()
        # index_select, not flat[token_of]: its backward is an index_add, much faster on CPU than index_put.
        parts = flat.index_select(0, token_of).split(counts)
        routed = torch.cat([expert(part) for expert, part in zip(self.experts, parts)])
        routed = routed * weights.reshape(-1)[order, None].to(routed.dtype)
        out = routed.new_zeros(flat.shape).index_add_(0, token_of, routed)
        for shared in self.shared_experts:
            out = out + shared(flat)

        aux_loss = x.new_zeros((), dtype=torch.float32)
        if self.training:
            aux_loss = self._balance_loss(scores, experts, token_mask, batch, seq)
        return out.view(batch, seq, hidden), aux_loss

    def _balance_loss(self, scores, experts, token_mask, batch, seq):
        """aux = alpha · mean over sequences of Σ_e f_e·P_e, padding left out of counts and means.

        f_e = E/(k·T) · (assignments to e), P_e = mean router probability of e over the T real
        tokens; perfectly balanced routing gives exactly alpha. With `seq_aux=False` the whole
        batch is one sequence.
        """
        groups = batch if self.seq_aux else 1
        valid = token_mask.reshape(groups, -1).to(scores.dtype)  # [groups, tokens]
        n_valid = valid.sum(dim=1).clamp(min=1)
        per_assignment = valid.repeat_interleave(self.top_k, dim=1)
        counts = scores.new_zeros(groups, self.n_experts).scatter_add_(
            1, experts.reshape(groups, -1), per_assignment
        )
        with torch.no_grad():
            self.expert_load.copy_(counts.sum(0) / counts.sum().clamp(min=1))
        if self.aux_loss_alpha == 0:
            return scores.new_zeros(())
        f = counts * self.n_experts / (self.top_k * n_valid[:, None])
        p = (scores.view(groups, -1, self.n_experts) * valid[..., None]).sum(dim=1) / n_valid[:, None]
        return self.aux_loss_alpha * (f * p).sum(dim=1).mean()


class Block(nn.Module):
    def __init__(self, config: TinyMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask, past_key_values, token_mask):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            h, aux_loss = self.mlp(h, token_mask)
        else:
            h, aux_loss = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + self.dropout(h), aux_loss


class TinyMindModel(nn.Module):
    """The decoder body: embedding, blocks, final norm. Returns hidden states and the summed aux loss."""

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        batch, seq = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take SDPA's mask-free kernels
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1)
            else:
                # Left-padded prompts: count positions from each row's first real token.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        attn_mask = causal_mask(attention_mask, batch, seq, past, input_ids.device)
        token_mask = (
            attention_mask[:, -seq:] if attention_mask is not None else input_ids.new_ones(batch, seq)
        )

        x = self.dropout(self.embed_tokens(input_ids))
        cos, sin = self.rotary(position_ids, x.dtype)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x, layer_aux = checkpoint(
                    block, x, cos, sin, attn_mask, past_key_values, token_mask, use_reentrant=False
                )
            else:
                x, layer_aux = block(x, cos, sin, attn_mask, past_key_values, token_mask)
            aux_loss = aux_loss + layer_aux
        return self.norm(x), aux_loss


def causal_mask(attention_mask, batch, seq, past, device):
    """Boolean [batch, 1, seq, past+seq] mask (True = may attend), or None when SDPA's own causal flag suffices.

    The flag suffices without padding, and also when padding only trails the real tokens of a
    fresh (uncached) batch, as in training: a real token never looks ahead to a pad, and what
    the pads compute is never used. Explicit masks push SDPA onto slower kernels.
    """
    trailing_padding_only = (
        attention_mask is not None and past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    )
    if (attention_mask is None or trailing_padding_only) and (past == 0 or seq == 1):
        return None
    total = past + seq
    query_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= query_pos
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
        # A padded query row with every key masked would give NaN; let it see itself (its output is unused).
        allowed = allowed | (torch.arange(total, device=device)[None, :] == query_pos)
    return allowed.expand(batch, 1, seq, total)


class PackedDecoder:
    """The network as `fast_generate` runs it: inference only, built from the model once per call.

    At batch 1 a decode step is some sixty small matmuls and a few hundred tiny ops, and on a CPU
    their per-call cost rivals the arithmetic. This computes exactly what the modules compute,
    with q/k/v and gate/up packed into one matrix each (fewer, larger matmuls), rotary angles
    looked up from a table, keys and values written into a preallocated cache (attention over
    its filled part needs no mask), and none of the forward's masks, position bookkeeping,
    dropout or aux loss.
    tests/test_fast_paths.py holds it to the modules' logits.
    """

    def __init__(self, model, batch, max_len):
        self.config = config = model.config
        body = model.model
        device = body.embed_tokens.weight.device
        # Under autocast, pack straight into the autocast dtype: a packed matrix is no leaf
        # parameter, so autocast would otherwise re-cast it on every step.
        dtype = body.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        self.blocks = body.layers
        self.packed = [self.pack(block, dtype) for block in body.layers]
        self.embed_tokens, self.norm, self.lm_head = body.embed_tokens, body.norm, model.lm_head
        positions = torch.arange(max_len, device=device)[None]
        # [1, 1, max_len, head_dim] in the embedding's dtype, as the modules' forward makes them
        self.cos, self.sin = body.rotary(positions, body.embed_tokens.weight.dtype)
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)

    @staticmethod
    def pack(block, dtype):
        def cast(weight):
            return weight.to(dtype)

        def swiglu(ffn):
            return cast(torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])), cast(ffn.down_proj.weight)

        attn, mlp = block.self_attn, block.mlp
        qkv = cast(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        if isinstance(mlp, MoEFeedForward):
            ffn = ([swiglu(expert) for expert in mlp.experts], [swiglu(shared) for shared in mlp.shared_experts])
        else:
            ffn = swiglu(mlp)
        return qkv, cast(attn.o_proj.weight), ffn

    def __call__(self, input_ids, start):
        """Logits of the last position of `input_ids`, which sit at positions start, start+1, ..."""
        c = self.config
        batch, seq = input_ids.shape
        end = start + seq
        assert start == 0 or seq == 1, "a prompt, then one token at a time"
        cos, sin = self.cos[:, :, start:end], self.sin[:, :, start:end]
        x = self.embed_tokens(input_ids)
        for i, (block, (qkv, o_proj, ffn)) in enumerate(zip(self.blocks, self.packed)):
            h = F.linear(block.input_layernorm(x), qkv).view(batch, seq, -1, c.head_dim).transpose(1, 2)
            n_qk = c.num_attention_heads + c.num_key_value_heads
            qk = apply_rotary(h[:, :n_qk], cos, sin)  # one rotation for the query and key heads together
            self.keys[i, :, :, start:end] = qk[:, c.num_attention_heads:]
            self.values[i, :, :, start:end] = h[:, n_qk:]
            y = F.scaled_dot_product_attention(
                qk[:, :c.num_attention_heads], self.keys[i, :, :, :end], self.values[i, :, :, :end],
                is_causal=seq > 1, enable_gqa=c.num_key_value_heads != c.num_attention_heads,
            )
            x = x + F.linear(y.transpose(1, 2).reshape(batch, seq, -1), o_proj)
            h = block.post_attention_layernorm(x)
            x = x + (self.moe(block.mlp, ffn, h) if isinstance(block.mlp, MoEFeedForward) else swiglu(h, *ffn))
        return self.lm_head(self.norm(x[:, -1:]))[:, -1].float()

    @staticmethod
    def moe(moe, packed, h):
        """One token: run only its k experts. A prompt (several tokens) goes through the module's dispatch."""
        if h.shape[0] * h.shape[1] > 1:
            return moe(h, h.new_ones(h.shape[:2]))[0]
        experts, shared = packed
        weights, chosen = moe.gate(h).float().softmax(dim=-1).topk(moe.top_k, dim=-1)
        if moe.norm_topk_prob and moe.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = sum(swiglu(h, *expert) for expert in shared) if shared else torch.zeros_like(h)
        for weight, index in zip(weights.view(-1).tolist(), chosen.view(-1).tolist()):
            out = out + weight * swiglu(h, *experts[index])
        return out


def swiglu(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class TinyMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyMindConfig):
        super().__init__(config)
        self.model = TinyMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        labels=None,
        position_ids=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Logits, the summed MoE aux loss, the KV cache and, given HF-style `labels`, `.loss` = masked CE + aux."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, past_key_values)
        # Generation only needs the last position's logits; skipping the rest saves the vocab matmul.
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            mask = targets != -100
            loss = masked_cross_entropy(logits[:, :-1], targets.masked_fill(~mask, 0), mask) + aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
        )

    def _init_weights(self, module):
        super()._init_weights(module)
        # from_pretrained builds the model on the meta device; the rotary table is no weight, so refill it here.
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.frequencies())

    @torch.no_grad()
    def fast_generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, eos_token_id=None):
        """`generate` for unpadded prompts, greedy or sampled, at a fraction of its per-token cost.

        One `PackedDecoder` step per token, and no logits processors, stopping criteria or cache
        bookkeeping: at batch 1 on a CPU that framework work is as large as the matmuls. Returns
        the prompt followed by the new tokens, like `generate`; a row that produced
        `eos_token_id` is padded with `pad_token_id` until every row has, and then it stops.
        """
        batch, prompt_len = input_ids.shape
        decoder = PackedDecoder(self, batch, prompt_len + max_new_tokens)
        tokens, step_input, start = [input_ids], input_ids, 0
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = decoder(step_input, start)
            start += step_input.size(1)
            if temperature > 0:
                logits = logits / temperature
                if top_k:
                    kth_best = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth_best, float("-inf"))
                step_input = torch.multinomial(logits.softmax(dim=-1), 1)
            else:
                step_input = logits.argmax(dim=-1, keepdim=True)
            if eos_token_id is not None:
                step_input = step_input.masked_fill(finished[:, None], self.config.pad_token_id or 0)
                finished |= step_input[:, 0] == eos_token_id
            tokens.append(step_input)
            if eos_token_id is not None and bool(finished.all()):
                break
        return torch.cat(tokens, dim=1)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    def moe_layers(self):
        return [block.mlp for block in self.model.layers if isinstance(block.mlp, MoEFeedForward)]

    def parameter_counts(self):
        """(total, active per token): tied weights counted once; only k of the routed experts are active."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers():
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            inactive += (moe.n_experts - moe.top_k) * per_expert
        return total, total - inactive
