"""The TinyMind network, top to bottom: norm, rotary, attention, feed-forward, MoE, block, model.

A Llama-style decoder: token embedding → N pre-norm blocks (RMSNorm → grouped-query
attention with rotary positions → RMSNorm → SwiGLU (or ReLU²-gated) feed-forward or
Mixture-of-Experts) → RMSNorm → LM head, tied to the embedding unless told otherwise, its
logits optionally soft-capped. Module names are the state-dict layout of docs/architecture.md,
so `state_dict()` is exactly that layout and MiniMind2-layout `.pth` files load strictly.
Fast inference decoding lives in generate.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import TinyMindConfig

# torch.nn.functional.grouped_mm is the public name of torch._grouped_mm; older torch releases have only the latter.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def token_cross_entropy(logits, targets, with_log_z=False):
    """Next-token cross-entropy at every position, [rows, width] float32 from [rows, width, vocab] logits: the one
    place the network's output meets its targets (the LM loss, the preference and RL log-probabilities, and
    evaluation all call it; distillation's soft KL is chunked the same way). With `with_log_z`, also log Z, the log-normaliser of each position's softmax, for the
    z-loss (CE = log Z − the target's logit: no second pass over the vocabulary).

    It works through the positions a chunk at a time (`ChunkedCrossEntropy`), so the float32 copy of the logits
    that an exact softmax needs exists for one chunk at once, never for the whole batch: with a 151,936-token
    vocabulary that copy is 20 GB at 32 × 1024 positions. Inside a compiled function (the trainer compiles the
    model alone, but a caller may compile the loss with it) the plain formula is traced instead, for the compiler
    to fuse."""
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():  # inductor fuses the loss into kernels that keep no float32 copy
        log_z = torch.logsumexp(flat_logits.float(), dim=-1)
        per_token = log_z - flat_logits.gather(1, flat_targets[:, None]).squeeze(1).float()
    else:
        per_token, log_z = ChunkedCrossEntropy.apply(flat_logits, flat_targets)
    if not with_log_z:
        return per_token.view(targets.shape)
    return per_token.view(targets.shape), log_z.view(targets.shape)


class ChunkedCrossEntropy(torch.autograd.Function):
    """(cross-entropy, log Z) per row of [rows, vocab] logits, each in float32, computed and differentiated a
    chunk of rows at a time. The backward recomputes each chunk's softmax from the saved log Z instead of keeping
    it: d CE / d logits = softmax − one-hot, d log Z / d logits = softmax."""

    CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 logits per chunk
    # On a CPU a chunk small enough to stay in its cache while the softmax passes over it: 4 MB made the loss of
    # a 16 x 256-token batch over 6,400 tokens 1.4x faster, forward and backward, than 64 MB chunks.
    CPU_CHUNK_ELEMENTS = 1 << 20

    @staticmethod
    def chunks(logits):
        """Slices of the rows of [rows, vocab] `logits`, each holding at most CHUNK_ELEMENTS of them
        (CPU_CHUNK_ELEMENTS on a CPU, if fewer): shared by every chunked loss."""
        rows, vocab = logits.shape
        limit = ChunkedCrossEntropy.CHUNK_ELEMENTS
        if logits.device.type == "cpu":
            limit = min(limit, ChunkedCrossEntropy.CPU_CHUNK_ELEMENTS)
        size = max(1, limit // vocab)
        return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]

    @staticmethod
    def forward(ctx, logits, targets):
        per_token = logits.new_empty(logits.size(0), dtype=torch.float32)
        log_z = torch.empty_like(per_token)
        for rows in ChunkedCrossEntropy.chunks(logits):
            chunk = logits[rows].float()
            log_z[rows] = torch.logsumexp(chunk, dim=-1)
            per_token[rows] = log_z[rows] - chunk.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, log_z)
        return per_token, log_z

    @staticmethod
    def backward(ctx, grad_per_token, grad_log_z):
        logits, targets, log_z = ctx.saved_tensors
        grad = torch.empty_like(logits)
        if grad_per_token is None:
            grad_per_token = torch.zeros_like(log_z)
        weight = grad_per_token if grad_log_z is None else grad_per_token + grad_log_z
        in_place = logits.dtype == torch.float32  # the chunk's softmax is computed in the gradient's own memory
        for rows in ChunkedCrossEntropy.chunks(logits):
            softmax = grad[rows] if in_place else None
            softmax = torch.sub(logits[rows].float(), log_z[rows, None], out=softmax).exp_()
            softmax.mul_(weight[rows, None]).scatter_add_(1, targets[rows, None], -grad_per_token[rows, None])
            if not in_place:
                grad[rows] = softmax
        return grad, None


def masked_cross_entropy(logits, targets, loss_mask, num_tokens=None):
    """Mean next-token cross-entropy over the positions where `loss_mask` is 1.

    One loss per position keeps the mask honest: padding and prompt tokens are removed, not
    averaged in. The sum is divided by `num_tokens` when given (the trainer passes the
    trained-token count of a whole optimizer step, so accumulated micro-batches add up to one
    large batch), else by the mask's own sum. A mask of all zeros gives 0, not NaN.
    """
    return masked_mean(token_cross_entropy(logits, targets), loss_mask, num_tokens)


def masked_mean(per_token, loss_mask, num_tokens=None):
    """Σ per_token · mask / (num_tokens, else Σ mask), both of the same shape."""
    mask = loss_mask.to(per_token.dtype)
    denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
    return (per_token * mask).sum() / denominator.clamp(min=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    # Normalise in float32 even under bf16 autocast: the mean of squares loses too much in 8 bits.
    normed = F.rms_norm(x.float(), weight.shape, weight.float(), eps)
    # Under autocast only matmuls read the output: hand it over in their dtype, cast once here
    # rather than in each of the q/k/v (or gate/up) linears, forward and backward.
    if torch.is_autocast_enabled(x.device.type):
        return normed.to(torch.get_autocast_dtype(x.device.type))
    return normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions asked for, in the Hugging Face Llama (rotate-half) convention,
    optionally stretched by YaRN (`config.rope_scaling`) for contexts past the trained length."""

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.attention_factor = 1.0 if self.scaling is None else self.scaling.get("attention_factor", 1.0)
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moved or cast (`model.to(torch.bfloat16)` to serve in bf16), the frequencies stay float32: rounded to
        8 bits their angles would drift by up to a radian within a few hundred positions."""
        super()._apply(fn, recurse)
        self.inv_freq = self.frequencies().to(self.inv_freq.device)
        return self

    def frequencies(self):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        if self.scaling is None:
            return inv_freq
        # YaRN: frequencies that turn fewer than beta_slow times over the original length are divided by the
        # factor (interpolated), those turning more than beta_fast times are kept, a linear ramp in between.
        factor, original = self.scaling["factor"], self.scaling["original_max_position_embeddings"]

        def dimension_turning(rotations):  # the (fractional) frequency index that turns `rotations` times
            return self.dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(dimension_turning(self.scaling.get("beta_fast", 32.0))), 0)
        high = min(math.ceil(dimension_turning(self.scaling.get("beta_slow", 1.0))), self.dim - 1)
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        return inv_freq * (1 - ramp) + inv_freq / factor * ramp

    def forward(self, position_ids, dtype):
        """(cos, signed sin), each [batch, 1, seq, head_dim], as `apply_rotary` takes them."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [batch, seq, head_dim / 2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, signed_sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        return cos[:, None].to(dtype), signed_sin[:, None].to(dtype)


def apply_rotary(x, cos, signed_sin):
    """Rotate each head's pairs (x_i, x_{i + d/2}) by the position's angles: the Llama (rotate-half) convention,
    x·cos + rotate_half(x)·sin, with rotate_half's sign kept in the second table (`signed_sin`: −sin, then sin),
    so it is a swap of the halves and one multiply-add: fewer, cheaper operations on the decode path."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), signed_sin)


def attend(q, k, v, mask=None, causal=False, dropout=0.0):
    """The attention core of training, `generate` and the fast decoder alike: scaled dot-product attention of
    [batch, heads, seq, head_dim] queries over keys and values, grouped-query when there are fewer key/value
    heads. `mask`: boolean, True where a query may look; `causal`: SDPA's own causal mask instead (fastest)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                          enable_gqa=k.size(1) != q.size(1))


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
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # The gate of the value embedding (zero at init: a gate of 1), from the input's first channels.
        self.ve_gate = (nn.Linear(min(VALUE_GATE_CHANNELS, config.hidden_size), self.n_kv_heads, bias=False)
                        if has_value_embed(config, layer_idx) else None)

    def forward(self, x, cos, sin, attn_mask, past_key_values, value_embed=None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if value_embed is not None:
            v = self.add_value_embed(v, x, value_embed)
        q, k = self.position(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # Without a mask the only case left is a fresh causal prefix, where SDPA's causal kernel is fastest.
        y = attend(q, k, v, attn_mask, causal=attn_mask is None and seq > 1,
                   dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))

    def add_value_embed(self, v, x, value_embed):
        """Values [batch, kv_heads, seq, head_dim] plus the tokens' value embedding [batch, seq, kv_heads·head_dim],
        each head's scaled by 2·sigmoid(ve_gate(the input's first channels)), between 0 and 2 (nanochat's)."""
        batch, seq, _ = x.shape
        gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features])).transpose(1, 2)
        embedded = value_embed.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return v + (gate[..., None] * embedded).to(v.dtype)  # the table is not autocast: keep the values' dtype

    def position(self, q, k, cos, sin):
        """Queries and keys made position-aware: the q/k norm where the model has one (MiniMind-3, Qwen3), then
        the rotary."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class FeedForward(nn.Module):
    """A gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU with act = silu (the default), or ReLU²."""

    def __init__(self, config: TinyMindConfig):
        super().__init__()
        self.act = config.hidden_act
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self.act))


VALUE_GATE_CHANNELS = 32


def has_value_embed(config, layer_idx):
    """Whether block `layer_idx` has a value embedding: with `config.value_embeds`, every other block counted
    back from the last, which always has one (nanochat's placement)."""
    return config.value_embeds and layer_idx % 2 == (config.num_hidden_layers - 1) % 2


def gated(gate, up, act="silu"):
    """The feed-forward's activation, of its gate and up projections: act(gate) * up, where act is silu (SwiGLU)
    or relu2, ReLU(x)² (what transformers calls "relu2")."""
    return (F.silu(gate) if act == "silu" else F.relu(gate).square()) * up


def softcap(logits, cap):
    """cap · tanh(logits / cap): logits kept within ±cap (`config.logit_softcap`; 0 leaves them as they are).
    Inside a compiled function the plain formula, for the compiler to fuse; else `ChunkedSoftcap`."""
    if not cap:
        return logits
    if torch.compiler.is_compiling():
        return cap * torch.tanh(logits / cap)
    return ChunkedSoftcap.apply(logits, cap)


class ChunkedSoftcap(torch.autograd.Function):
    """cap · tanh(logits / cap) over [..., vocab] logits, computed and differentiated a chunk of rows at a time
    (ChunkedCrossEntropy's chunks) into one buffer. Written as three whole-tensor operations, each pass and each of
    its three gradients takes a fresh buffer the size of the logits: on a CPU, for 16 x 256 positions over 6,400
    tokens, forward and backward, that took 0.32 s over the cross-entropy's 0.09, and chunked 0.16 (0.09 and 0.07
    over 0.05 once freed memory is kept, as a training run keeps it: trainer/loop.py's keep_freed_memory)."""

    @staticmethod
    def forward(ctx, logits, cap):
        flat = logits.reshape(-1, logits.size(-1))
        capped = torch.empty_like(flat)
        for rows in ChunkedCrossEntropy.chunks(flat):
            torch.div(flat[rows], cap, out=capped[rows]).tanh_().mul_(cap)
        capped = capped.view(logits.shape)
        ctx.save_for_backward(capped)
        ctx.cap = cap
        return capped

    @staticmethod
    def backward(ctx, grad):
        (capped,) = ctx.saved_tensors
        capped, grad = capped.reshape(-1, capped.size(-1)), grad.reshape(-1, capped.size(-1))
        grad_logits = torch.empty_like(capped)
        for rows in ChunkedCrossEntropy.chunks(capped):
            # d/dx cap · tanh(x / cap) = 1 − tanh(x / cap)² = 1 − (capped / cap)²
            out = torch.mul(capped[rows], capped[rows], out=grad_logits[rows])
            out.mul_(-1 / ctx.cap**2).add_(1).mul_(grad[rows])
        return grad_logits.view(ctx.saved_tensors[0].shape), None


class MoEFeedForward(nn.Module):
    """Softmax router over `n_routed_experts` gated experts, top-k per token, plus always-on shared experts; with
    `expert_bias_rate`, a per-expert bias on the scores chooses the experts (DeepSeek-V3's aux-loss-free balancing).

    Dispatch is one path for training and inference: sort the token→expert assignments by
    expert, run every expert once on its contiguous slice (an empty slice still runs, so an
    expert that got no token has a zero gradient rather than none, and DDP never waits on
    it), weight, and add back per token with `index_add_`. The slices run one expert at a time
    (`dispatch = "per_expert"`: their sizes read back to the host, fastest on a CPU) or all
    together in two grouped matmuls whose slice ends stay on the device (`"grouped"`: no host
    read, so a compiled model is one graph; the default on CUDA).
    """

    DISPATCHES = ("auto", "per_expert", "grouped")

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
        # Real-token assignments each expert received in training forwards since the trainer last read them.
        self.register_buffer("expert_counts", torch.zeros(self.n_experts), persistent=False)
        self.bias_rate = config.expert_bias_rate  # how far each step moves the bias (0 once frozen, as under LoRA)
        # Saved with the weights, so inference chooses as training did; None (no state-dict key) without a rate.
        self.register_buffer("expert_bias", torch.zeros(self.n_experts) if self.bias_rate else None)
        self.dispatch = "auto"  # one of DISPATCHES; auto: grouped on CUDA, per expert elsewhere
        # grouped_mm needs rows whose byte strides are multiples of 16: widths that are multiples of 8 (bfloat16).
        self.groupable = config.hidden_size % 8 == 0 and config.intermediate_size % 8 == 0

    def forward(self, x, token_mask, stacked=None):
        """x: [batch, seq, hidden]; token_mask: [batch, seq], 1 for real tokens. Returns (output, aux_loss).
        `stacked`: the experts' weights as `stacked_experts` made them once, for the grouped dispatch (a decoder's;
        training stacks them anew each forward, as the weights change every step)."""
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        if torch.is_autocast_enabled(x.device.type):
            # Cast once here rather than in every expert's linears (each token meets k + n_shared of them).
            flat = flat.to(torch.get_autocast_dtype(x.device.type))
        scores, weights, experts = self.route(flat)

        assigned_expert = experts.reshape(-1)
        order = assigned_expert.argsort(stable=True)
        token_of = order // self.top_k
        # Counted into a tensor of static shape (bincount's depends on the values: a graph break when compiled).
        counts = assigned_expert.new_zeros(self.n_experts).scatter_add_(0, assigned_expert, torch.ones_like(assigned_expert))
        # index_select, not flat[token_of]: its backward is an index_add, much faster on CPU than index_put.
        sorted_inputs = flat.index_select(0, token_of)
        if stacked is not None or self.grouped(flat):
            routed = self.grouped_experts(sorted_inputs, counts, stacked)
        else:
            routed = self.per_expert(sorted_inputs, counts)
        routed = routed * weights.reshape(-1)[order, None].to(routed.dtype)
        out = routed.new_zeros(flat.shape).index_add_(0, token_of, routed)
        for shared in self.shared_experts:
            out = out + shared(flat)

        aux_loss = x.new_zeros((), dtype=torch.float32)
        if self.training:
            aux_loss = self._balance_loss(scores, experts, token_mask, batch, seq)
        return out.view(batch, seq, hidden), aux_loss

    def _apply(self, fn, recurse=True):
        """Cast (`model.to(torch.bfloat16)` to serve), the balancing bias stays float32: its steps of 1e-3 would
        round away in 8 bits, and near-ties of the router flip."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device, torch.float32)
        return self

    @torch.no_grad()
    def update_bias(self, counts):
        """After an optimizer step: each expert's bias moves by the rate towards the mean load, from `counts`, the
        step's assignments to each expert (a device tensor: no host read)."""
        if self.bias_rate and self.expert_bias is not None:
            self.expert_bias += self.bias_rate * torch.sign(counts.mean() - counts).to(self.expert_bias.dtype)

    def grouped(self, x):
        """Whether this forward runs the grouped dispatch: asked for, or auto where it pays and computes in the
        run's own precision (bf16 on a CUDA GPU of compute capability 8 or more, which grouped_mm needs); with
        widths grouped_mm takes and plain linear experts (an expert with LoRA adapters runs as modules)."""
        wanted = self.dispatch == "grouped" or (
            self.dispatch == "auto" and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 8)
        plain = all(type(getattr(expert, name)) is nn.Linear
                    for expert in self.experts for name in ("gate_proj", "up_proj", "down_proj"))
        return wanted and self.groupable and plain

    @torch.compiler.disable  # traced, each new set of counts would be a new graph (until the recompile limit)
    def per_expert(self, x, counts):
        """The per_expert dispatch: each expert's matmuls over its slice of the sorted tokens `x`, their sizes
        read back to the host; eager under torch.compile (one graph break, no recompiles)."""
        return torch.cat([expert(part) for expert, part in zip(self.experts, x.split(counts.tolist()))])

    @staticmethod
    def grouped_dtype(x):
        """grouped_mm ignores autocast and compiles only in bfloat16: on CUDA and under torch.compile both sides
        are cast to it; eager elsewhere keeps the input's dtype."""
        return torch.bfloat16 if x.is_cuda or torch.compiler.is_compiling() else x.dtype

    def stacked_experts(self, dtype):
        """The experts' weights stacked for grouped_mm, in `dtype`: gate|up [experts, 2·width, hidden] and down
        [experts, hidden, width]."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
        return gate_up.to(dtype), torch.stack([e.down_proj.weight for e in self.experts]).to(dtype)

    def grouped_experts(self, x, counts, stacked=None):
        """Every expert on its slice of the expert-sorted rows `x` (`counts` rows each, a device tensor), in two
        `grouped_mm`s over the stacked weights (`stacked`, or stacked here) in `grouped_dtype`."""
        ends = counts.cumsum(0).to(torch.int32)
        dtype = self.grouped_dtype(x)
        gate_up, down = stacked if stacked is not None else self.stacked_experts(dtype)
        gate, up = grouped_mm(x.to(dtype), gate_up.to(dtype).transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return grouped_mm(gated(gate, up, self.experts[0].act), down.to(dtype).transpose(1, 2), offs=ends).to(x.dtype)

    def route(self, flat):
        """The router's choice for [tokens, hidden] inputs: (softmax scores [tokens, experts], the chosen experts'
        weights [tokens, k], their indices [tokens, k]). With a balancing bias, the bias picks the experts and the
        scores alone weight them."""
        scores = self.gate(flat).float().softmax(dim=-1)
        if self.expert_bias is not None:
            experts = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, experts)
        else:
            weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:  # at top-1 the chosen expert's weight is exactly 1, as in Qwen3-MoE and MiniMind-3
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights, experts

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
            self.expert_counts += counts.sum(0)
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

    def forward(self, x, cos, sin, attn_mask, past_key_values, token_mask, value_embed=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values, value_embed))
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
        # Keyed by block index; empty (no weights at all) without config.value_embeds.
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.num_key_value_heads * config.head_dim)
            for i in range(config.num_hidden_layers) if has_value_embed(config, i)})

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, one_document_per_row=None):
        """`attention_mask` numbers each position's document (0: padding), as `dataset.Batch` describes.
        `one_document_per_row`, what the caller knows of the mask (as `collate` does, on the host): True, no row
        holds two documents and padding only ends rows, so positions count from 0 and SDPA's causal kernel masks
        right; False, some row holds several, so the documents' mask is built. Either way nothing looks at the
        mask's values and the training forward never waits for the device. None (unknown: generation, Hugging Face
        callers): the mask is read to choose."""
        batch, seq = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if one_document_per_row and past == 0:
            attn_mask = None
            if position_ids is None:
                position_ids = torch.arange(seq, device=input_ids.device)[None].expand(batch, -1)
        else:
            if position_ids is None:
                position_ids = document_positions(attention_mask, past, seq, input_ids.device).expand(batch, -1)
            attn_mask = causal_mask(attention_mask, batch, seq, past, input_ids.device,
                                    look=one_document_per_row is None)
        token_mask = attention_mask[:, -seq:] > 0 if attention_mask is not None else input_ids.new_ones(batch, seq)

        x = self.dropout(self.embed_tokens(input_ids))
        cos, sin = self.rotary(position_ids, x.dtype)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            value_embed = self.value_embed(i, input_ids)
            if self.gradient_checkpointing and self.training:
                x, layer_aux = checkpoint(
                    block, x, cos, sin, attn_mask, past_key_values, token_mask, value_embed, use_reentrant=False
                )
            else:
                x, layer_aux = block(x, cos, sin, attn_mask, past_key_values, token_mask, value_embed)
            aux_loss = aux_loss + layer_aux
        return self.norm(x), aux_loss

    def value_embed(self, layer_idx, input_ids):
        """Block `layer_idx`'s value embedding of `input_ids`, or None where it has none."""
        key = str(layer_idx)
        return self.value_embeds[key](input_ids) if key in self.value_embeds else None


def document_positions(attention_mask, past, seq, device):
    """Each position's offset in its document: 0, 1, 2, ... from the row's (or each packed document's) first
    token, so left-padded prompts and packed rows get the positions they would have alone."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    index = torch.arange(attention_mask.size(1), device=device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=-1).values
    return (index - first)[:, -seq:]


def causal_mask(attention_mask, batch, seq, past, device, look=True):
    """Boolean [batch, 1, seq, past+seq] mask (True = may attend), or None when SDPA's own causal flag suffices.

    The flag suffices without padding, and also when padding only trails the single document of
    each row of a fresh (uncached) batch, as in padded training batches: a real token never looks
    ahead to a pad, and what the pads compute is never used. Otherwise a query sees the earlier
    positions of its own document (a pad sees earlier pads, so no row is all-masked and NaN).
    Explicit masks push SDPA onto slower kernels. Finding that out reads the mask back from the device; with
    `look` False the caller knows a mask is needed, and none is read.
    """
    trailing_padding_only = look and (
        attention_mask is not None and past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        and int(attention_mask.max()) <= 1
    )
    if (attention_mask is None or trailing_padding_only) and (past == 0 or seq == 1):
        return None
    total = past + seq
    query_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= query_pos
    if attention_mask is not None:
        documents = attention_mask[:, :total]
        allowed = allowed & (documents[:, None, None, :] == documents[:, None, past:total, None])
    return allowed.expand(batch, 1, seq, total)


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
        with torch.no_grad():
            for block in self.model.layers:
                if block.self_attn.ve_gate is not None:
                    block.self_attn.ve_gate.weight.zero_()  # value embeddings start at a gate of 1

    def forward(
        self,
        input_ids,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        labels=None,
        position_ids=None,
        logits_to_keep=0,
        one_document_per_row=None,
        **kwargs,
    ):
        """Logits, the summed MoE aux loss, the KV cache and, given HF-style `labels`, `.loss` = masked CE + aux.
        `one_document_per_row`: see TinyMindModel.forward (`dataset.Batch.model_inputs()` passes it)."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, past_key_values, one_document_per_row)
        # Generation only needs the last position's logits; skipping the rest saves the vocab matmul.
        logits = softcap(self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden),
                         self.config.logit_softcap)

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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    def moe_layers(self):
        return [block.mlp for block in self.model.layers if isinstance(block.mlp, MoEFeedForward)]

    def set_moe_dispatch(self, dispatch):
        """How every MoE layer runs its experts: one of MoEFeedForward.DISPATCHES."""
        for moe in self.moe_layers():
            moe.dispatch = dispatch

    def parameter_counts(self):
        """(total, active per token): tied weights counted once; only k of the routed experts are active."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers():
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            inactive += (moe.n_experts - moe.top_k) * per_expert
        return total, total - inactive
