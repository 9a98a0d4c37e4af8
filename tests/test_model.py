"""model/: the loss, the MoE layer and its aux loss, generation with the cache, the state-dict layout."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (MoEFeedForward, TinyMindConfig, TinyMindForCausalLM, masked_cross_entropy, masked_mean,
                   token_cross_entropy)

from conftest import moe_config, tiny_config


# ---- masked cross-entropy -------------------------------------------------------------------


def test_masked_cross_entropy_equals_hand_computation_with_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, 0], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        expected += -torch.log_softmax(logits[b, t], dim=-1)[targets[b, t]].item()
    expected /= 3
    assert masked_cross_entropy(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_log_z_is_the_log_normaliser_and_the_cross_entropy_is_unchanged_beside_it():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5) * 4
    targets = torch.tensor([[1, 4, 0], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = sum(math.log(sum(math.exp(v) for v in logits[b, t].tolist())) ** 2 for b, t in [(0, 0), (0, 1), (1, 0)])
    per_token, log_z = token_cross_entropy(logits, targets, with_log_z=True)
    assert torch.equal(per_token, token_cross_entropy(logits, targets))
    for num_tokens, count in ((None, 3), (6, 6)):
        assert masked_mean(log_z.square(), mask, num_tokens).item() == pytest.approx(expected / count, rel=1e-6)


def test_masked_positions_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    base = masked_cross_entropy(logits, targets, mask)
    garbled_logits, garbled_targets = logits.clone(), targets.clone()
    garbled_logits[mask == 0] = 100 * torch.randn_like(garbled_logits[mask == 0])
    garbled_targets[mask == 0] = 3
    assert masked_cross_entropy(garbled_logits, garbled_targets, mask).item() == base.item()
    # The trap: a default reduction="mean" averages padding into the loss.
    assert F.cross_entropy(garbled_logits.view(-1, 7), garbled_targets.view(-1)).item() != pytest.approx(base.item())


def test_all_zero_mask_gives_zero_not_nan():
    loss = masked_cross_entropy(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert loss.item() == 0.0


def test_num_tokens_normalises_by_the_given_count():
    logits, targets, mask = torch.randn(1, 4, 5), torch.randint(0, 5, (1, 4)), torch.tensor([[1, 1, 1, 0]])
    assert masked_cross_entropy(logits, targets, mask, num_tokens=6).item() == pytest.approx(
        masked_cross_entropy(logits, targets, mask).item() * 3 / 6, rel=1e-6
    )


def test_labels_give_hf_style_loss_plus_aux():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config()).train()
    ids = torch.randint(3, 97, (2, 9))
    labels = ids.clone()
    labels[1, 6:] = -100
    out = model(ids, labels=labels)
    mask = labels[:, 1:] != -100
    expected = masked_cross_entropy(out.logits[:, :-1], labels[:, 1:].clamp(min=0), mask) + out.aux_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.aux_loss.item() > 0


# ---- MoE aux loss ----------------------------------------------------------------------------


def formula_aux(scores, experts, valid, n_experts, top_k, alpha):
    """The load-balancing loss of one group of tokens, written out with loops."""
    real = [t for t in range(len(valid)) if valid[t]]
    total = 0.0
    for e in range(n_experts):
        chosen = sum(int(e in experts[t].tolist()) for t in real)
        f = n_experts / (top_k * len(real)) * chosen
        p = sum(scores[t, e].item() for t in real) / len(real)
        total += f * p
    return alpha * total


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_equals_formula_with_padding(seq_aux):
    torch.manual_seed(1)
    moe = MoEFeedForward(moe_config(seq_aux=seq_aux, aux_loss_alpha=0.3)).train()
    x = torch.randn(2, 5, 64)
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    _, aux = moe(x, token_mask)
    scores = moe.gate(x.view(-1, 64)).softmax(-1)
    experts = scores.topk(2, dim=-1).indices
    valid = token_mask.view(-1).tolist()
    if seq_aux:
        expected = sum(
            formula_aux(scores[b * 5:(b + 1) * 5], experts[b * 5:(b + 1) * 5], valid[b * 5:(b + 1) * 5], 4, 2, 0.3)
            for b in range(2)
        ) / 2
    else:
        expected = formula_aux(scores, experts, valid, 4, 2, 0.3)
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    assert moe.expert_counts.sum().item() == 2 * sum(valid)  # k assignments per real token, padding left out


@pytest.mark.parametrize("top_k", [1, 2])
def test_uniform_router_gives_alpha_per_layer(top_k):
    model = TinyMindForCausalLM(moe_config(num_experts_per_tok=top_k, aux_loss_alpha=0.1, num_hidden_layers=3)).train()
    for moe in model.moe_layers():
        torch.nn.init.zeros_(moe.gate.weight)  # P_e = 1/E, so Σ_e f_e·P_e = (Σ_e f_e)/E = 1 for any assignment
    out = model(torch.randint(0, 97, (2, 8)))
    assert out.aux_loss.item() == pytest.approx(3 * 0.1, rel=1e-6)


@pytest.mark.parametrize("top_k, experts", [(1, [[0], [1], [2], [3]]), (2, [[0, 1], [2, 3], [1, 0], [3, 2]])])
def test_balanced_assignments_give_alpha(top_k, experts):
    """Counts of exactly k·T/E per expert with any probabilities summing to 1 give alpha."""
    moe = MoEFeedForward(moe_config(num_experts_per_tok=top_k, aux_loss_alpha=0.1))
    scores = torch.softmax(torch.randn(4, 4), dim=-1)
    aux = moe._balance_loss(scores, torch.tensor(experts), torch.ones(1, 4), batch=1, seq=4)
    # f_e = 1 for every e, so the loss is alpha times the sum of mean probabilities = alpha.
    assert aux.item() == pytest.approx(0.1, rel=1e-6)


def test_collapsed_routing_costs_more_than_balanced():
    moe = MoEFeedForward(moe_config(num_experts_per_tok=1, aux_loss_alpha=0.1))
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(4, 4)
    aux = moe._balance_loss(scores, torch.zeros(4, 1, dtype=torch.long), torch.ones(1, 4), batch=1, seq=4)
    assert aux.item() == pytest.approx(0.1 * 4 * 0.7, rel=1e-6)  # f_0 = E, P_0 = 0.7


def test_aux_loss_is_sum_over_layers_and_reaches_router():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config()).train()
    per_layer = []
    handles = [
        moe.register_forward_hook(lambda mod, args, output: per_layer.append(output[1].item()))
        for moe in model.moe_layers()
    ]
    out = model(torch.randint(0, 97, (2, 8)))
    for handle in handles:
        handle.remove()
    assert len(per_layer) == 2
    assert out.aux_loss.item() == pytest.approx(sum(per_layer), rel=1e-6)
    out.aux_loss.backward()
    for moe in model.moe_layers():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_zero_in_eval_and_for_dense():
    ids = torch.randint(0, 97, (1, 6))
    assert TinyMindForCausalLM(moe_config()).eval()(ids).aux_loss.item() == 0.0
    dense_aux = TinyMindForCausalLM(tiny_config()).train()(ids).aux_loss
    assert dense_aux.dim() == 0 and dense_aux.item() == 0.0


# ---- MoE dispatch ----------------------------------------------------------------------------


def test_relu2_feed_forward_and_softcapped_logits_equal_hand_computations():
    from model.model import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(tiny_config(hidden_act="relu2"))
    x = torch.randn(3, 64)
    gate, up = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    expected = (torch.where(gate > 0, gate * gate, torch.zeros_like(gate)) * up) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), expected)

    model = TinyMindForCausalLM(tiny_config(logit_softcap=0.05)).eval()
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        hidden, _ = model.model(ids, None, None, None)
        raw = hidden @ model.lm_head.weight.T
        capped = model(ids).logits
    assert raw.abs().max() > 0.05 and capped.abs().max() <= 0.05
    torch.testing.assert_close(capped, 0.05 * torch.tanh(raw / 0.05))


def test_value_embeddings_add_each_tokens_row_to_the_values_gated_per_head_in_every_other_block():
    from model.model import Attention

    config = tiny_config(num_hidden_layers=3, value_embeds=True)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(config)
    assert sorted(model.model.value_embeds) == ["0", "2"]  # every other block, the last included
    assert [block.self_attn.ve_gate is not None for block in model.model.layers] == [True, False, True]
    assert all(block.self_attn.ve_gate.weight.abs().sum() == 0 for block in model.model.layers[::2])  # gate 1
    assert "model.value_embeds.0.weight" in model.state_dict()

    attention = Attention(config, 0)
    torch.nn.init.normal_(attention.ve_gate.weight)
    x, table = torch.randn(2, 5, 64), torch.randn(2, 5, 2 * 16)  # 2 key/value heads of 16
    v = torch.randn(2, 2, 5, 16)
    gate = 2 / (1 + torch.exp(-x[..., :32] @ attention.ve_gate.weight.T))  # [batch, seq, heads]
    expected = v + gate.permute(0, 2, 1)[..., None] * table.view(2, 5, 2, 16).permute(0, 2, 1, 3)
    torch.testing.assert_close(attention.add_value_embed(v, x, table), expected)

    # Zero rows leave the values as they were: the logits of the same weights without value embeddings.
    plain = TinyMindForCausalLM(tiny_config(num_hidden_layers=3))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "value_embeds" not in k and "ve_gate" not in k})
    with torch.no_grad():
        for table in model.model.value_embeds.values():
            table.weight.zero_()
    ids = torch.randint(3, 97, (2, 7))
    torch.testing.assert_close(model.eval()(ids).logits, plain.eval()(ids).logits)


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("logit_softcap", -1.0)])
def test_unknown_activation_or_negative_softcap_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_the_balancing_bias_chooses_the_experts_and_the_scores_alone_weight_them():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(expert_bias_rate=0.1, norm_topk_prob=False)).eval()
    flat = torch.randn(6, 64)
    plain_scores, plain_weights, plain_experts = moe.route(flat)  # a zero bias chooses as the scores do
    assert plain_experts.tolist() == plain_scores.topk(2).indices.tolist()
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 wins every token's first place
    scores, weights, experts = moe.route(flat)
    assert (experts[:, 0] == 3).all() and torch.equal(weights, scores.gather(1, experts))
    assert "expert_bias" in moe.state_dict() and "expert_bias" not in MoEFeedForward(moe_config()).state_dict()

    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5: the overloaded expert down, the idle one up
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 5.0]))


def test_weights_without_a_routing_bias_load_at_zero_and_a_bias_needs_the_flag(tmp_path):
    from model import CheckpointError
    from model.weights import load_into

    torch.manual_seed(0)
    plain = TinyMindForCausalLM(moe_config())
    biased = TinyMindForCausalLM(moe_config(expert_bias_rate=1e-3))
    load_into(biased, plain.state_dict(), tmp_path / "plain.pth")
    assert all(not moe.expert_bias.any() for moe in biased.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(biased(torch.arange(3, 11)[None]).logits, plain(torch.arange(3, 11)[None]).logits)
    with pytest.raises(CheckpointError, match="pass --expert_bias_rate above 0"):
        load_into(TinyMindForCausalLM(moe_config()), biased.state_dict(), tmp_path / "biased.pth")
    assert biased.to(torch.bfloat16).moe_layers()[0].expert_bias.dtype == torch.float32


def test_moe_of_identical_experts_equals_the_dense_ffn():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(n_shared_experts=0, norm_topk_prob=True)).eval()
    for expert in moe.experts[1:]:
        expert.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 7, 64)
    out, _ = moe(x, torch.ones(2, 7))
    torch.testing.assert_close(out, moe.experts[0](x), atol=1e-6, rtol=1e-5)


def test_sorted_dispatch_equals_naive_per_token_loop():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(num_experts_per_tok=2, n_shared_experts=2)).eval()
    x = torch.randn(3, 5, 64)
    out, _ = moe(x, torch.ones(3, 5))
    flat = x.view(-1, 64)
    scores = moe.gate(flat).softmax(-1)
    expected = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        weights, experts = scores[t].topk(2)
        weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            expected[t] += w * moe.experts[int(e)](flat[t])
        for shared in moe.shared_experts:
            expected[t] += shared(flat[t])
    torch.testing.assert_close(out.view(-1, 64), expected, atol=1e-6, rtol=1e-6)


def test_expert_given_no_tokens_gets_zero_gradient():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(num_experts_per_tok=1)).train()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:3, :3] = torch.eye(3)  # positive inputs give experts 0-2 a positive logit, expert 3 zero
    out, aux = moe(torch.rand(2, 8, 64) + 0.1, torch.ones(2, 8))
    (out.sum() + aux).backward()
    assert moe.expert_counts[3].item() == 0.0
    for p in moe.experts[3].parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert moe.experts[0].gate_proj.weight.grad.abs().sum() > 0


# ---- generation, cache, layout ---------------------------------------------------------------


@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_generation_equals_uncached_recomputation(use_moe):
    torch.manual_seed(0)
    config = moe_config() if use_moe else tiny_config()
    model = TinyMindForCausalLM(config).eval()
    prompt = torch.randint(3, 97, (1, 6))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_cached_logits_equal_full_forward_with_left_padding():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        prefix = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        step = model(ids[:, 5:], attention_mask=mask, past_key_values=prefix.past_key_values, use_cache=True)
        alone = model(ids[1:, 3:]).logits  # the padded row without its padding
    torch.testing.assert_close(step.logits, full[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_right_padding_leaves_real_tokens_unchanged():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config()).eval()
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, :5]).logits
    torch.testing.assert_close(padded[:1, :5], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_packed_row_computes_each_document_as_if_alone(use_moe):
    """attention_mask 1, 1, 2, 2, 2, 0: two documents and a pad in one row (dataset.Batch's convention)."""
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config() if use_moe else tiny_config()).eval()
    first, second = torch.randint(3, 97, (1, 4)), torch.randint(3, 97, (1, 3))
    row = torch.cat([first, second, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    documents = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0]])
    with torch.no_grad():
        packed = model(row, attention_mask=documents).logits
        torch.testing.assert_close(packed[:, :4], model(first).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 4:7], model(second).logits, atol=1e-5, rtol=1e-5)


def test_sampling_generation_runs_with_cache():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config()).eval()
    out = model.generate(torch.randint(3, 97, (2, 4)), max_new_tokens=5, do_sample=True, top_p=0.9, top_k=20)
    assert out.shape == (2, 9)


def test_tying_the_head_over_an_untied_checkpoint_is_refused_instead_of_overwriting_the_embedding(tmp_path):
    from model import CheckpointError, load_model, save_weights

    torch.manual_seed(0)
    untied = TinyMindForCausalLM(tiny_config(tie_word_embeddings=False))
    save_weights(untied.state_dict(), untied.config, tmp_path / "untied.pth")
    with pytest.raises(CheckpointError, match=r"untied.pth has an untied head .*pass --tie_word_embeddings false"):
        load_model(tmp_path / "untied.pth", overrides={"tie_word_embeddings": True})
    tied = TinyMindForCausalLM(tiny_config())  # a tied head equal to its embedding still loads under the override
    save_weights(tied.state_dict(), tied.config, tmp_path / "tied.pth")
    assert load_model(tmp_path / "tied.pth", overrides={"tie_word_embeddings": True}).config.tie_word_embeddings


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])  # a tied .safetensors holds no lm_head at all
def test_untying_the_head_over_a_tied_checkpoint_starts_it_from_the_embedding(tmp_path, suffix):
    from model import load_model, save_weights

    torch.manual_seed(0)
    tied = TinyMindForCausalLM(tiny_config()).eval()
    save_weights(tied.state_dict(), tied.config, tmp_path / f"tied.{suffix}")
    untied = load_model(tmp_path / f"tied.{suffix}", overrides={"tie_word_embeddings": False}).eval()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.lm_head.weight, tied.model.embed_tokens.weight)
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        assert torch.equal(untied(ids).logits, tied(ids).logits)


def test_save_load_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config())
    model.save_pretrained(tmp_path)
    loaded = TinyMindForCausalLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.save(model.state_dict(), tmp_path / "w.pth")
    again = TinyMindForCausalLM(moe_config())
    again.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)
    # from_pretrained memory-maps safetensors at 8-byte offsets, and the CPU BLAS picks its summation
    # order by alignment: the same weights then give logits equal only to rounding.
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_qk_norm_adds_per_head_norms_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(qk_norm=True)).eval()
    keys = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= keys
    assert model.state_dict()["model.layers.0.self_attn.q_norm.weight"].shape == (16,)  # head_dim
    assert not any("_norm" in key and "self_attn" in key for key in TinyMindForCausalLM(tiny_config()).state_dict())
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight.mul_(3)  # the norms take part
        changed = model(ids).logits
        model.model.layers[0].self_attn.q_norm.weight.div_(3)
        assert not torch.allclose(changed, model(ids).logits)
    model.save_pretrained(tmp_path)
    loaded = TinyMindForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_state_dict_speaks_the_design_layout():
    keys = set(TinyMindForCausalLM(moe_config(num_hidden_layers=1)).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.mlp.gate.weight"}
    expected |= {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {f"model.layers.0.mlp.experts.{j}.{p}_proj.weight" for j in range(4) for p in ("gate", "up", "down")}
    expected |= {f"model.layers.0.mlp.shared_experts.0.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert keys == expected


def test_parameter_counts_of_the_presets():
    total, active = TinyMindForCausalLM(TinyMindConfig()).parameter_counts()
    assert total == active and math.isclose(total / 1e6, 25.8, abs_tol=0.05)
    total, active = TinyMindForCausalLM(TinyMindConfig(use_moe=True)).parameter_counts()
    per_expert = 3 * 512 * 1408
    assert total - active == 8 * 2 * per_expert


def test_default_intermediate_size():
    assert TinyMindConfig(hidden_size=512).intermediate_size == 1408
    assert TinyMindConfig(hidden_size=768, num_attention_heads=8).intermediate_size == 2048


def test_the_rotary_frequencies_stay_float32_when_the_model_is_cast():
    model = TinyMindForCausalLM(tiny_config(rope_theta=1e6)).to(torch.bfloat16)
    rotary = model.model.rotary
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, rotary.frequencies())


def test_a_starving_expert_is_flagged_only_after_a_window_of_steps():
    from types import SimpleNamespace

    from trainer.metrics import ExpertLoadWatch

    watch = ExpertLoadWatch([SimpleNamespace(n_experts=4)])  # threshold: a quarter of the fair 1/4
    starving = torch.tensor([[0.5, 0.3, 0.19, 0.01]])
    said = []
    for step in range(2 * ExpertLoadWatch.MIN_STEPS):  # logged every step, as --log_interval 1
        watch.observe(starving if step else torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
        shares, warnings = watch.summary()
        assert shares["load_l0_e3"] == pytest.approx(0.01 if step else 0.25)  # the interval's own mean
        said.append(warnings)
    # the first window holds a fair step, so expert 3 was not starved throughout it; the second was
    assert [i for i, warnings in enumerate(said) if warnings] == [2 * ExpertLoadWatch.MIN_STEPS - 1]
    assert said[-1] == ["expert 3 of MoE layer 0 got under 0.062 of the tokens at every step of the last 10 "
                        "(max 0.010): it is collapsing; raise --aux_loss_alpha or lower --learning_rate"]
