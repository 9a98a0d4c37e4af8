"""GPU habits, held on the CPU: the training forward is one graph, optimizer steps read the device only for a
log row, the MoE dispatch CUDA uses (grouped matmuls, nothing read back) computes what the per-expert one does,
a compiled run compiles once per width bucket, and the loss never holds a float32 copy of every position's
logits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dataset import Packed, PretrainDataset, collate
from model import TinyMindForCausalLM, masked_cross_entropy, token_cross_entropy
from model.model import ChunkedCrossEntropy, softcap
from trainer.flags import add_model_flags, add_training_flags, model_config, new_parser, parse
from trainer.loop import Trainer
from model.muon import POLAR_EXPRESS, QUINTIC, BatchedMuon, newton_schulz
from trainer.objectives import LanguageModeling
from trainer.run_folder import run_paths

from conftest import TINY, pretrain_file, tiny_config

VARIANTS = {
    "dense": {},
    "dense_qk_norm": {"qk_norm": True},
    "dense_nanochat": {"hidden_act": "relu2", "logit_softcap": 15.0, "value_embeds": True},
    "moe_top2_shared": {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "moe_top1_qk_norm": {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 1, "n_shared_experts": 0,
                         "qk_norm": True},
}


def padded_batch(seed=0):
    """Two rows of unequal length, right-padded as collate pads them."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in (16, 11):
        ids = torch.randint(1, 97, (length,), generator=generator)
        samples.append((ids[:-1], ids[1:], torch.ones(length - 1, dtype=torch.long)))
    return collate(samples, pad_id=0)


def training_loss(model, batch):
    out = model(batch.input_ids, **batch.model_inputs())
    return masked_cross_entropy(out.logits, batch.targets, batch.loss_mask) + out.aux_loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_training_forward_is_one_graph(variant):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(**VARIANTS[variant])).train()
    model.set_moe_dispatch("grouped")
    batch = padded_batch()
    explained = torch._dynamo.explain(lambda: training_loss(model, batch))()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_per_expert_dispatch_compiles_once_whatever_the_routing():
    """The CPU's MoE dispatch reads its experts' token counts back to the host: compiled, it breaks the graph
    there, and new counts (every step's) must not compile anew."""
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(**VARIANTS["moe_top2_shared"])).train()
    model.set_moe_dispatch("per_expert")
    graphs, counts, compiled_so_far = [], [], []
    compiled = torch.compile(model, backend=lambda graph, inputs: graphs.append(graph) or graph.forward)
    for seed in range(3):  # fewer than dynamo's recompile limit (8), past which it would stop compiling anyway
        training_loss(compiled, padded_batch(seed)).backward()
        counts.append([layer.expert_counts.tolist() for layer in model.moe_layers()])
        compiled_so_far.append(len(graphs))
        for layer in model.moe_layers():
            layer.expert_counts.zero_()
    assert counts[0] != counts[1] != counts[2]  # the routing changed between steps
    assert compiled_so_far[0] == compiled_so_far[1] == compiled_so_far[2]  # all in the first step


@pytest.mark.parametrize("variant", ["moe_top2_shared", "moe_top1_qk_norm"])
def test_grouped_dispatch_equals_the_per_expert_one_with_gradients(variant):
    torch.manual_seed(0)
    per_expert = TinyMindForCausalLM(tiny_config(**VARIANTS[variant])).train()
    grouped = TinyMindForCausalLM(per_expert.config).train()
    grouped.load_state_dict(per_expert.state_dict())
    per_expert.set_moe_dispatch("per_expert")
    grouped.set_moe_dispatch("grouped")
    batch = padded_batch()
    losses = [training_loss(model, batch) for model in (per_expert, grouped)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    gradients = dict(per_expert.named_parameters())
    for name, parameter in grouped.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name].grad, atol=1e-6, rtol=1e-5, msg=name)


class HostReads(TorchDispatchMode):
    """Counts the operations that hand a tensor's value to Python (`.item()`, `bool()`, `int()` and the like all
    dispatch `_local_scalar_dense`); `.tolist()` is counted where it is called."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["dense", "moe_top2_shared", "dense_packed_isolated"])
def test_optimizer_steps_read_the_device_only_for_a_log_row(tmp_path, tokenizer, monkeypatch, variant):
    moe = ["--model_type", "moe", "--n_routed_experts", "4", "--num_experts_per_tok", "2",
           "--moe_dispatch", "grouped"] if variant.startswith("moe") else []
    data = pretrain_file(tmp_path, copies=5)
    parser = new_parser("test")
    add_model_flags(parser)
    add_training_flags(parser, default_data=str(data))
    args = parse(parser, [*TINY, *moe, "--device", "cpu", "--out_dir", str(tmp_path / "output"), "--max_steps", "10",
                          "--optimizer", "muon"])
    torch.manual_seed(0)
    dataset = PretrainDataset(data, tokenizer, args.max_seq_len)
    if variant.endswith("packed_isolated"):  # several documents a row, attention kept inside each
        dataset = Packed(dataset, isolated=True)
    trainer = Trainer(TinyMindForCausalLM(model_config(args)), dataset, LanguageModeling(), args,
                      run_paths("pretrain", args))
    steps = [[dataset.collate([dataset[i % len(dataset)] for i in range(j, j + 4)])] for j in range(0, 40, 4)]
    assert any(not batch.one_document_per_row for [batch] in steps) or not variant.endswith("packed_isolated")
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        reads.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with reads:  # the optimizers' steps (fused AdamW, batched Muon) included
        for micro_batches in steps:
            trainer.optimizer_step(micro_batches)
        assert reads.count == 0, f"{reads.count} host reads in {len(steps)} steps"
        stats = trainer.read_steps()  # a log row's
    assert reads.count == 1 and math.isfinite(stats["loss"]) and trainer.progress.step == len(steps)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dense_qk_norm", "moe_top2_shared"])
def test_the_model_compiles_whole_for_forward_and_backward(variant):
    torch.manual_seed(0)
    eager = TinyMindForCausalLM(tiny_config(**VARIANTS[variant])).train()
    eager.set_moe_dispatch("grouped")
    compiled_model = TinyMindForCausalLM(eager.config).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled_model.set_moe_dispatch("grouped")
    compiled = torch.compile(compiled_model, fullgraph=True)
    batch = padded_batch()
    expected = training_loss(eager, batch)
    loss = training_loss(compiled, batch)
    expected.backward()
    loss.backward()
    # The grouped matmuls run in bfloat16 once compiled (grouped_mm compiles only in it): close, not equal.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)
    assert all(parameter.grad is not None for parameter in compiled_model.parameters())


def training_run(tmp_path, tokenizer, *flags):
    data = pretrain_file(tmp_path, copies=5)
    parser = new_parser("test")
    add_model_flags(parser)
    add_training_flags(parser, default_data=str(data))
    args = parse(parser, [*TINY, "--device", "cpu", "--out_dir", str(tmp_path / "output"), *flags])
    torch.manual_seed(0)
    dataset = PretrainDataset(data, tokenizer, args.max_seq_len)
    run_paths("pretrain", args).dir.mkdir(parents=True)
    return Trainer(TinyMindForCausalLM(model_config(args)), dataset, LanguageModeling(), args,
                   run_paths("pretrain", args))


def test_a_compiled_run_compiles_once_per_width_bucket(tmp_path, tokenizer, monkeypatch):
    compiled_shapes = []

    def counting_backend(graph, example_inputs):
        compiled_shapes.append(tuple(example_inputs[0].shape))
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **options: real_compile(
        module, **{**options, "backend": counting_backend}))
    trainer = training_run(tmp_path, tokenizer, "--compile", "true", "--max_steps", 20, "--batch_size", 2)
    widths = {len(trainer.dataset[i][0]) for i in range(len(trainer.dataset))}
    trainer.train()
    assert len(widths) > 4  # the samples' own lengths would compile this many shapes
    assert trainer.widths == [16, 24, 40, 47] and 1 <= len(compiled_shapes) <= len(trainer.widths)


def test_a_compile_that_fails_says_so_once_and_training_goes_on(tmp_path, tokenizer, monkeypatch, capsys):
    def failing_compile(module, **options):
        def call(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)
        return call

    eager = training_run(tmp_path / "eager", tokenizer, "--max_steps", 2)
    monkeypatch.setattr(torch, "compile", failing_compile)
    fallback = training_run(tmp_path / "fallback", tokenizer, "--compile", "true", "--max_steps", 2)
    batches = [fallback.dataset.collate([fallback.dataset[i] for i in range(4)])]
    for run in (fallback, eager):
        run.optimizer_step(batches)
    assert fallback.read_steps()["loss"] == pytest.approx(eager.read_steps()["loss"], rel=1e-6)
    fallback.optimizer_step(batches)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: torch.compile failed (BackendCompilerFailed")


def test_a_batch_pins_and_moves_every_tensor_and_keeps_its_host_counts(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor.shape) or tensor.clone())
    batch = padded_batch()
    moved = batch.pin_memory().to("cpu")
    assert len(pinned) == 4 and (moved.tokens, moved.trained, moved.one_document_per_row) == (25, 25, True)
    assert all(torch.equal(a, b) for a, b in zip(moved.tensors().values(), batch.tensors().values()))


def chunked_logits(monkeypatch, chunk_rows, scale, vocab=1000):
    """Random [3, 50, vocab] logits to differentiate, with the chunked functions set to chunks of `chunk_rows` rows."""
    monkeypatch.setattr(ChunkedCrossEntropy, "CHUNK_ELEMENTS", chunk_rows * vocab)
    torch.manual_seed(0)
    return (torch.randn(3, 50, vocab) * scale).requires_grad_()


@pytest.mark.parametrize("chunk_rows", [7, 1000])  # 22 chunks, or one
def test_the_chunked_softcap_equals_the_formula_bit_for_bit_with_its_gradient(monkeypatch, chunk_rows):
    logits = chunked_logits(monkeypatch, chunk_rows, scale=20)
    weights = torch.randn(logits.shape)
    expected = 15.0 * torch.tanh(logits / 15.0)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), logits)
    capped = softcap(logits, 15.0)
    grad, = torch.autograd.grad((capped * weights).sum(), logits)
    assert torch.equal(capped, expected) and capped.abs().max() < 15
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert softcap(logits, 0.0) is logits


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_the_chunked_loss_equals_the_whole_vocabulary_one_with_its_gradients(monkeypatch, chunk_rows):
    vocab = 1000
    logits = chunked_logits(monkeypatch, chunk_rows, scale=3, vocab=vocab)
    targets = torch.randint(0, vocab, (3, 50))
    weights = torch.rand(2, 3, 50)
    flat = logits.reshape(-1, vocab)
    expected = F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(3, 50)
    expected_log_z = torch.logsumexp(logits, dim=-1)
    expected_grad, = torch.autograd.grad((expected * weights[0] + expected_log_z * weights[1]).sum(), logits)
    per_token, log_z = token_cross_entropy(logits, targets, with_log_z=True)
    grad, = torch.autograd.grad((per_token * weights[0] + log_z * weights[1]).sum(), logits)
    torch.testing.assert_close(per_token, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(log_z, expected_log_z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    alone, = torch.autograd.grad((token_cross_entropy(logits, targets) * weights[0]).sum(), logits)
    expected = F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(3, 50)
    torch.testing.assert_close(alone, torch.autograd.grad((expected * weights[0]).sum(), logits)[0], atol=1e-5,
                               rtol=1e-5)


def test_batched_muon_makes_torch_muons_update_and_shares_its_state():
    torch.manual_seed(0)
    shapes = [(64, 64)] * 3 + [(96, 64)] * 2 + [(64, 96), (48, 200)]  # square, tall and wide stacks
    reference = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    batched = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    in_float32 = [torch.nn.Parameter(p.detach().clone()) for p in reference]  # the default on a CPU
    options = {"lr": 2e-3, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    optimizers = (torch.optim.Muon(reference, **options), BatchedMuon(batched, **options, ns_dtype=torch.bfloat16),
                  BatchedMuon(in_float32, **options))
    for _ in range(3):
        for p, q, r in zip(reference, batched, in_float32):
            p.grad = torch.randn(p.shape)
            q.grad, r.grad = p.grad.clone(), p.grad.clone()
        before = [p.detach().clone() for p in reference]
        before_float32 = [r.detach().clone() for r in in_float32]
        for optimizer in optimizers:
            optimizer.step()
        for p, q, r, start, start_float32 in zip(reference, batched, in_float32, before, before_float32):
            expected, largest = p - start, (p - start).abs().max().item()
            # In bfloat16, as torch.optim.Muon: equal within its rounding (on this CPU, bit for bit)
            torch.testing.assert_close(q - start, expected, atol=1e-3 * largest, rtol=1e-2)
            # In float32: torch.optim.Muon's bfloat16 rounding (8 bits, over 5 iterations) is the whole difference,
            # a few percent of the largest entry at most, about 1% on average
            update = r - start_float32
            torch.testing.assert_close(update, expected, atol=5e-2 * largest, rtol=0)
            assert 0 < (update - expected).abs().mean() < 2e-2 * expected.abs().mean()
            assert (r - start - (p - start)).abs().max() > 0  # it did run in another precision
    fresh = BatchedMuon([torch.nn.Parameter(p.detach().clone()) for p in reference], **options)
    fresh.load_state_dict(optimizers[0].state_dict())  # a resume state written with torch.optim.Muon
    assert all(torch.equal(fresh.state[p]["momentum_buffer"], optimizers[0].state[q]["momentum_buffer"])
               for p, q in zip(fresh.param_groups[0]["params"], reference))


def test_normuon_divides_each_row_of_muons_update_by_its_running_root_mean_square_and_keeps_the_norm():
    torch.manual_seed(0)
    shapes = [(64, 64)] * 2 + [(96, 64), (48, 200)]
    plain = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    normed = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    options = {"lr": 2e-3, "weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw"}
    muon, normuon = BatchedMuon(plain, **options), BatchedMuon(normed, **options, row_beta2=0.9)
    running = [torch.zeros(shape[0], 1) for shape in shapes]
    for _ in range(3):
        for p, q in zip(plain, normed):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in plain]
        before_normed = [q.detach().clone() for q in normed]
        muon.step()
        normuon.step()
        for p, q, start, start_normed, v in zip(plain, normed, before, before_normed, running):
            update = p.detach() - start  # Muon's update: the orthogonalised momentum times the step size
            v.mul_(0.9).add_(0.1 * update.square().mean(dim=1, keepdim=True))  # a constant step size cancels below
            rows = update / v.sqrt()
            expected = rows * update.norm() / rows.norm()
            torch.testing.assert_close(q.detach() - start_normed, expected, atol=1e-6, rtol=1e-4)
            assert (q.detach() - start_normed - update).abs().max() > 1e-2 * update.abs().max()  # it did change
    # the running means are state: a resumed optimizer takes the next step exactly
    assert all(normuon.state[q]["second_momentum_buffer"].shape == (q.shape[0], 1) for q in normed)
    resumed = [torch.nn.Parameter(q.detach().clone()) for q in normed]
    fresh = BatchedMuon(resumed, **options, row_beta2=0.9)
    fresh.load_state_dict(copy.deepcopy(normuon.state_dict()))  # as from a file: tensors of its own
    for p, q in zip(resumed, normed):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    fresh.step()
    normuon.step()
    assert all(torch.equal(p, q) for p, q in zip(resumed, normed))  # the next step is the one it would have been


def test_polar_express_applies_its_own_quintic_at_each_step_and_orthogonalises_closer_than_one_quintic():
    """Checked on the singular values: each step maps every singular value s of the normalised matrix to
    a s + b s^3 + c s^5 with that step's coefficients, leaving the singular vectors as they are."""
    torch.manual_seed(0)
    for shape in [(96, 64), (48, 200)]:  # tall and wide
        stack = torch.randn(3, *shape, dtype=torch.float64)
        for steps in (5, 7):  # past its five steps the last quintic repeats
            got = newton_schulz(stack, POLAR_EXPRESS, steps, 1e-7, torch.float64)
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            s = s / (stack.norm(dim=(1, 2), keepdim=True)[:, :, 0] * 1.01)
            for a, b, c in [*POLAR_EXPRESS, *[POLAR_EXPRESS[-1]] * (steps - 5)]:
                s = a * s + b * s**3 + c * s**5
            torch.testing.assert_close(got, u @ torch.diag_embed(s) @ vh, atol=1e-10, rtol=0)
        singular = {name: torch.linalg.svdvals(newton_schulz(stack, coefficients, 5, 1e-7, torch.float64))
                    for name, coefficients in (("quintic", QUINTIC), ("polar express", POLAR_EXPRESS))}
        assert (singular["polar express"] - 1).abs().max() < 0.15 < (singular["quintic"] - 1).abs().max()


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
    lambda params: BatchedMuon(params, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
    lambda params: BatchedMuon(params, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", row_beta2=0.95),
], ids=["fused_adamw", "batched_muon", "normuon"])
def test_a_step_with_found_inf_leaves_weights_and_state_as_they_were_without_a_host_read(make_optimizer):
    """The trainer's non-finite skip: NaN gradients, `found_inf` set, and nothing moves, bit for bit; the next good
    step is the step it would have been."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 8), (16, 8), (8, 24)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer, twin = make_optimizer(params), make_optimizer(twins)
    gradients = [[torch.randn(p.shape) for p in params] for _ in range(2)]

    def step(optimizer, params, grads, found_inf=None):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if found_inf is not None:
            optimizer.found_inf = torch.tensor(found_inf)
        optimizer.step()
        optimizer.__dict__.pop("found_inf", None)

    step(optimizer, params, gradients[0], 0.0)
    step(twin, twins, gradients[0])
    state = copy.deepcopy(optimizer.state_dict())
    weights = [p.detach().clone() for p in params]
    reads = HostReads()
    with reads:
        step(optimizer, params, [torch.full(p.shape, float("nan")) for p in params], 1.0)
    assert reads.count == 0
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    for before, after in zip(state["state"].values(), optimizer.state_dict()["state"].values()):
        assert all(torch.equal(before[key], after[key]) for key in before)
    step(optimizer, params, gradients[1], 0.0)
    step(twin, twins, gradients[1])
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("available, native_bf16, training, inference", [
    (False, False, "float32", "float32"), (True, True, "bfloat16", "bfloat16"), (True, False, "float16", "float32")])
def test_the_default_dtype_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch, available, native_bf16, training,
                                                                     inference):
    """A T4 or a V100 would run bfloat16 emulated, slower than float32 (torch's is_bf16_supported() says True there
    unless asked about native support): such a GPU trains in float16 with a loss scaler, and decodes in float32."""
    from trainer.flags import default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    assert (default_dtype("cuda", training=True), default_dtype("cuda", training=False)) == (training, inference)
    assert default_dtype("cpu", training=True) == "float32"

