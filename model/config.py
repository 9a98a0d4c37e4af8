"""TinyMindConfig: every number that shapes the network, with Hugging Face Llama/Qwen field names."""

import math

from transformers import PretrainedConfig


ACTIVATIONS = ("silu", "relu2")  # the feed-forward gates model.activation computes


class TinyMindConfig(PretrainedConfig):
    """A Llama-style decoder, dense or Mixture-of-Experts (`use_moe=True`).

    The defaults are the `small` preset (hidden 512, 8 layers, about 25.8M parameters).
    `intermediate_size=None` picks 64·ceil(hidden·8/3 / 64), the SwiGLU width that keeps the
    feed-forward's parameter count near a 4x GELU MLP while staying a multiple of 64.
    """

    model_type = "tinymind"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    hidden_act: str = "silu"  # the feed-forward's gate: silu (SwiGLU) or relu2 (ReLU², nanochat's, gated here)
    # c·tanh(logits / c) on the output logits, as nanochat and Gemma 2 do; 0 turns it off. No stock transformers
    # architecture pairs it with these blocks, so a model trained with it does not export.
    logit_softcap: float = 0.0
    qk_norm: bool = False  # a learned RMSNorm on every query and key head before the rotary (MiniMind-3, Qwen3)
    # nanochat's value embeddings: in every other block (the last included) a table of its own adds a vector per
    # token to the attention's values, gated per head. No stock architecture has them: such a model does not export.
    value_embeds: bool = False
    # None, or YaRN for inference past the trained length, in Hugging Face's form: {"rope_type": "yarn",
    # "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}.
    rope_scaling: dict | None = None
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.1
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router's scores to choose the experts
    # (not to weight them), moved by this much after every optimizer step, up for experts that got fewer tokens
    # than the mean, down for those that got more. 0: off (no bias).
    expert_bias_rate: float = 0.0
    seq_aux: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Reject shapes the network cannot be built with, naming the field to change."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("rotary embeddings need an even head size (hidden_size / num_attention_heads)")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.expert_bias_rate < 0:
            raise ValueError(f"expert_bias_rate {self.expert_bias_rate} must be 0 (off) or positive")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap {self.logit_softcap} must be 0 (off) or positive")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "yarn":
                raise ValueError(f"rope_scaling {kind!r}: only 'yarn' is supported")
            if not self.rope_scaling.get("factor", 0) > 1:
                raise ValueError(f"rope_scaling factor {self.rope_scaling.get('factor')} must be above 1")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                f"n_routed_experts {self.n_routed_experts}"
            )

    @staticmethod
    def yarn(factor, original_length) -> dict:
        """The YaRN settings MiniMind-3 ships: stretch the rotary wavelengths beyond `original_length` by `factor`,
        keep the fast ones (β_fast 32 rotations) and leave the attention scale at 1."""
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original_length),
                "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
