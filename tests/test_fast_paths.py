"""The fast paths give what the plain path gives: fast_generate / Decoder and sampling, autocast, compile, the bench."""

import copy
import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model import Sampling, TinyMindForCausalLM, fast_generate, masked_cross_entropy
from model.generate import DECODERS, Decoder, next_tokens, tensors_in
from model.model import RMSNorm

from conftest import make_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("use_moe, qk_norm, nanochat", [(False, False, False), (True, False, False),
                                                       (False, True, False), (False, False, True), (True, False, True)])
def test_the_decoder_logits_equal_the_modules(use_moe, qk_norm, nanochat):
    model = make_model(use_moe)
    if nanochat:  # ReLU² feed-forwards, capped logits (a cap the random logits reach), gated value embeddings
        torch.manual_seed(1)
        model = TinyMindForCausalLM(tiny_config(use_moe=use_moe, hidden_act="relu2", logit_softcap=0.5,
                                                value_embeds=True)).eval()
        with torch.no_grad():
            model.model.layers[1].self_attn.ve_gate.weight.normal_(0, 1.0)
    if qk_norm:  # per-head q/k norms with gains unlike 1
        torch.manual_seed(1)
        model = TinyMindForCausalLM(tiny_config(qk_norm=True)).eval()
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.q_norm.weight.normal_(1.0, 0.3)
                block.self_attn.k_norm.weight.normal_(1.0, 0.3)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        decoder = Decoder(model, batch=2, max_len=9)
        prompt_logits = decoder(ids[:, :6], 0)  # the prompt in one go, then one token at a time
        step_logits = [decoder(ids[:, t:t + 1], t) for t in range(6, 9)]
    torch.testing.assert_close(prompt_logits, full[:, 5], atol=1e-5, rtol=1e-5)
    for t, logits in zip(range(6, 9), step_logits):
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


def test_one_token_moe_decoding_with_relu2_experts_and_a_routing_bias_equals_the_modules():
    """A single sequence decodes through the decoder's own top-k path (not the module's dispatch)."""
    torch.manual_seed(2)
    model = TinyMindForCausalLM(tiny_config(use_moe=True, hidden_act="relu2", expert_bias_rate=1e-3)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias.normal_(0, 0.05)  # enough to overrule the router's first choice for some tokens
        ids = torch.randint(3, 97, (1, 9))
        full = model(ids).logits
        decoder = Decoder(model, batch=1, max_len=9)
        decoder(ids[:, :4], 0)
        for t in range(4, 9):
            torch.testing.assert_close(decoder(ids[:, t:t + 1], t), full[:, t], atol=1e-5, rtol=1e-5)
    plain = model.moe_layers()[0]
    h = torch.randn(20, 64)
    biased = plain.route(h)[2]
    plain.expert_bias.zero_()
    assert not torch.equal(biased, plain.route(h)[2])  # the bias did change some choices


def prefilled(model, lengths, decoder=None):
    """A decoder of one cache row per length (or `decoder`, its rows reused), each prefilled with all but the last
    token of a random sequence one longer; and the sequences."""
    sequences = [torch.randint(3, 97, (1, n + 1)) for n in lengths]
    decoder = decoder or Decoder(model, batch=len(lengths), max_len=8)
    for row, sequence in enumerate(sequences):
        decoder(sequence[:, :-1], 0, rows=slice(row, row + 1))
    return decoder, sequences


@pytest.mark.parametrize("rows", [[0, 1, 2], [1, 2], [0, 2], [2]], ids=["all", "consecutive", "gapped", "one"])
def test_decode_of_rows_at_their_own_positions_equals_the_modules(rows):
    """The engine's step: cache rows of different lengths, consecutive (read as a view) or not (gathered),
    one new token each, against each sequence run whole through the modules."""
    model = make_model(use_moe=False)
    lengths = [4, 7, 5]
    with torch.no_grad():
        decoder, sequences = prefilled(model, lengths)
        logits = decoder.decode(rows, torch.cat([sequences[row][:, -1] for row in rows]), [lengths[row] for row in rows])
        for index, row in enumerate(rows):
            torch.testing.assert_close(logits[index], model(sequences[row]).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_a_row_reused_after_a_sequence_that_left_nan_in_its_cache_decodes_cleanly():
    """A cache row outlives its request: what a failed one left past the next prompt (NaN from an overflow) is read
    by the batched steps masked, times zero, and must not poison the row's next request."""
    model = make_model(use_moe=False)
    with torch.no_grad():
        decoder, _ = prefilled(model, [7, 7])
        for cache in decoder.keys + decoder.values:
            cache[1, :, 3:] = float("nan")  # the end of row 1's earlier sequence
        decoder, sequences = prefilled(model, [4, 5], decoder)
        tokens, positions = torch.cat([sequence[:, -1] for sequence in sequences]), torch.tensor([4, 5])
        for logits in (decoder.step(tokens, positions), decoder.decode([0, 1], tokens, [4, 5])):
            for row, sequence in enumerate(sequences):
                torch.testing.assert_close(logits[row], model(sequence).logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_the_fixed_shape_decode_step_equals_the_modules_and_traces_to_one_graph(use_moe):
    """The step a CUDA graph captures: every cache row at its own position, whole-cache attention under a mask, MoE
    through the module's grouped dispatch (CUDA's); no host read, so dynamo traces it whole."""
    model = make_model(use_moe)
    model.set_moe_dispatch("grouped")
    lengths = [4, 7, 1]
    with torch.no_grad():
        decoder, sequences = prefilled(model, lengths)
        tokens, positions = torch.cat([sequence[:, -1] for sequence in sequences]), torch.tensor(lengths)
        logits = decoder.step(tokens, positions)
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], model(sequence).logits[0, -1], atol=1e-5, rtol=1e-5)
        explained = torch._dynamo.explain(decoder.step)(tokens, positions)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def engine_answers(model, prompts, graphs):
    """{request: its greedy tokens} from an engine of 4 slots serving `prompts` together, and the engine (closed)."""
    from model.engine import Engine, Request

    engine = Engine(model, eos_token_id=None, max_batch=4, context=16, graphs=graphs)
    done = {i: threading.Event() for i in range(len(prompts))}
    tokens = {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        def emit(token, reason, i=i):
            tokens[i].append(token) if reason is None else done[i].set()
        assert engine.submit(Request(prompt, 6 + i, Sampling(), emit, ignore_eos=True))
    assert all(event.wait(300) for event in done.values())
    engine.close()
    return tokens, engine


PROMPTS = [[5, 9, 13, 2], [7, 7], [3, 30, 31, 32, 33, 34]]


@pytest.mark.parametrize("use_moe", [False, True])
def test_the_engine_through_its_compiled_step_answers_as_through_the_eager_decoder(use_moe):
    """What the server runs on CUDA (there as a CUDA graph), compiled on this CPU: the same greedy tokens for
    requests that come and go (6, 7 and 8 tokens), idle slots decoding alongside; a MoE with the dispatch CUDA
    uses."""
    model = make_model(use_moe)
    model.set_moe_dispatch("grouped")
    compiled, engine = engine_answers(model, PROMPTS, graphs=True)
    assert engine.graphs  # it decoded through the compiled step to the end, rather than falling back
    assert compiled == engine_answers(model, PROMPTS, graphs=False)[0]


def test_a_closed_engine_cancels_what_it_holds_and_takes_no_more():
    from model.engine import Engine, Request

    engine = Engine(make_model(use_moe=False), eos_token_id=None, max_batch=1, context=4096)
    ends, started = [], threading.Event()

    def emit(token, reason):
        started.set() if reason is None else ends.append(reason)
    assert engine.submit(Request([5, 9], 10**6, Sampling(), emit, ignore_eos=True))  # runs until cut off
    assert engine.submit(Request([7], 4, Sampling(), emit, ignore_eos=True))  # waits for the one slot
    assert started.wait(60)
    engine.close()
    assert ends == ["cancelled", "cancelled"] and not engine.thread.is_alive()
    assert not engine.submit(Request([7], 4, Sampling(), emit))


def test_an_engine_takes_no_more_than_its_slots_and_queue_before_its_thread_admits_any():
    from model.engine import Engine, Request

    engine = Engine(make_model(use_moe=False), eos_token_id=None, max_batch=2, max_queue=1, context=64)
    with engine.condition:  # a burst: the engine's thread admits nothing meanwhile
        accepted = [engine.submit(Request([5], 2, Sampling(), lambda token, reason: None)) for _ in range(4)]
    engine.close()
    assert accepted == [True, True, True, False]  # two slots and one place in the queue


def test_an_engine_whose_step_fails_to_compile_warns_and_decodes_eagerly(monkeypatch):
    def compile_that_fails(function, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    model = make_model(use_moe=False)
    monkeypatch.setattr(torch, "compile", compile_that_fails)
    with warnings.catch_warnings(record=True) as caught:  # warned on the engine's thread
        warnings.simplefilter("always")
        fallen_back, engine = engine_answers(model, PROMPTS, graphs=True)
    assert not engine.graphs
    raised_at = f"{__file__}:{compile_that_fails.__code__.co_firstlineno + 2}"  # the `raise` line: what a report needs
    assert [str(w.message) for w in caught if "compiled decode step" in str(w.message)] == [
        f"the compiled decode step failed (RuntimeError: no C++ compiler at {raised_at}); decoding goes on eagerly"]
    assert fallen_back == engine_answers(model, PROMPTS, graphs=False)[0]


def test_generation_through_the_compiled_step_equals_the_eager_decoder():
    """`fast_generate(compile=True)` (3-eval's --compile), two prompts of one length: the same sampled tokens, and a
    second call of another length compiles once more rather than failing."""
    model = make_model(use_moe=False)
    for length in (5, 9):
        prompt = torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(length))
        sampling = Sampling(temperature=0.8, top_k=20)
        eager = fast_generate(model, prompt, 12, sampling, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "the compiled decode step failed")  # else it would decode eagerly
            compiled = fast_generate(model, prompt, 12, sampling, generator=torch.Generator().manual_seed(0),
                                     compile=True)
        assert torch.equal(compiled, eager)


@pytest.mark.parametrize("use_moe", [False, True])
def test_fast_generate_equals_hf_generate_greedy(use_moe):
    model = make_model(use_moe)
    prompt = torch.randint(3, 97, (1, 7))
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fast_generate(model, prompt, 20), expected)


def test_fast_generate_batch_rows_decode_independently():
    model = make_model(use_moe=True)
    prompts = torch.randint(3, 97, (3, 5))
    together = fast_generate(model, prompts, 8)
    for row in range(3):
        assert torch.equal(together[row:row + 1], fast_generate(model, prompts[row:row + 1], 8))


def test_fast_generate_stops_at_eos_and_pads_finished_rows():
    model = make_model(use_moe=False)
    prompts = torch.randint(3, 97, (2, 4))
    free = fast_generate(model, prompts, 10)
    eos = int(free[0, 4])  # row 0's first new token plays eos
    out = fast_generate(model, prompts, 10, eos_token_id=eos)
    pad = model.config.pad_token_id
    ends = []
    for row in range(2):
        new = free[row, 4:].tolist()
        end = new.index(eos) + 1 if eos in new else len(new)
        ends.append(end)
        assert out[row, 4:4 + end].tolist() == new[:end]
        assert (out[row, 4 + end:] == pad).all()
    assert out.shape[1] == 4 + max(ends)  # it stops once every row is done
    assert fast_generate(model, prompts[:1], 10, eos_token_id=eos).shape[1] == 5


def test_fast_generate_samples_within_top_k():
    model = make_model(use_moe=False)
    prompt = torch.randint(3, 97, (1, 4))
    torch.manual_seed(1)
    out = fast_generate(model, prompt, 6, Sampling(temperature=0.8, top_k=1))
    assert torch.equal(out, fast_generate(model, prompt, 6))  # top-1 sampling is greedy


def test_repetition_penalty_decodes_as_hf_generate_does():
    model = make_model(use_moe=False)
    prompt = torch.randint(3, 97, (1, 6))
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(fast_generate(model, prompt, 16, Sampling(repetition_penalty=1.5)), expected)


def test_sampling_keeps_exactly_the_tokens_hf_processors_keep():
    torch.manual_seed(0)
    logits, seen = torch.randn(4, 97) * 3, torch.randint(0, 97, (4, 5))
    sampling = Sampling(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    hf = logits
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                      TopPLogitsWarper(0.8)):
        hf = processor(seen, hf)
    allowed = torch.isfinite(hf)
    drawn = torch.cat([next_tokens(logits, seen, sampling) for _ in range(400)], dim=1)
    assert allowed.gather(1, drawn).all()  # never a token HF would cut
    for row in range(4):  # and every token it keeps is reachable (400 draws cover them at these sizes)
        assert set(drawn[row].tolist()) == set(allowed[row].nonzero().flatten().tolist())


def test_fast_generate_under_bf16_autocast_tracks_the_modules():
    model = make_model(use_moe=False)
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).logits.float()
        decoder = Decoder(model, batch=1, max_len=8)
        decoder(ids[:, :7], 0)
        last = decoder(ids[:, 7:], 7)
    torch.testing.assert_close(last, full[:, 7], atol=3e-2, rtol=3e-2)


def test_rms_norm_stays_float32_accurate_for_low_precision_input():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 64) * 30
    reference = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), reference, atol=1e-5, rtol=1e-5)
    low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), norm(x.bfloat16().float()).bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        handed_over = norm(x)  # in the dtype the next matmul wants, from a float32 computation
    assert handed_over.dtype == torch.bfloat16
    assert torch.equal(handed_over, norm(x).bfloat16())


@pytest.mark.parametrize("use_moe", [False, True])
def test_training_loss_and_grads_under_bf16_autocast_track_float32(use_moe):
    model = make_model(use_moe).train()
    ids, targets = torch.randint(3, 97, (2, 16)), torch.randint(3, 97, (2, 16))
    mask = torch.ones(2, 16)

    def loss_and_grad(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids)
            loss = masked_cross_entropy(out.logits, targets, mask) + out.aux_loss
        loss.backward()
        return loss.item(), model.model.embed_tokens.weight.grad.clone()

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_compiled_training_step_gives_the_eager_loss():
    model = make_model(use_moe=False).train()
    ids, targets = torch.randint(3, 97, (2, 16)), torch.randint(3, 97, (2, 16))
    mask = torch.ones(2, 16)
    eager = masked_cross_entropy(model(ids).logits, targets, mask)
    started = time.perf_counter()
    compiled = masked_cross_entropy(torch.compile(model)(ids).logits, targets, mask)
    if time.perf_counter() - started > 60:
        pytest.skip("torch.compile took over 60 s on this machine")
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)


def test_bench_smoke(tmp_path):
    from scripts import bench

    out = tmp_path / "bench.json"
    bench.main(["--config", str(ROOT / "configs/tiny.json"), "--batch_size", "1", "--seq_len", "16",
                "--repeats", "1", "--warmup", "0", "--new_tokens", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["cases"]) == set(bench.CASES)
    assert report["cases"]["generate"]["same_tokens"]
    for row in report["contenders"].values():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0


def test_the_engine_samples_a_steps_rows_together_as_each_would_alone():
    from types import SimpleNamespace

    from model.engine import Engine

    torch.manual_seed(0)
    logits = torch.randn(5, 97)
    settings = [Sampling(repetition_penalty=1.3), Sampling(repetition_penalty=1.3), Sampling(),
                Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.2), Sampling(temperature=1.0, top_k=5)]
    seen = [torch.randint(0, 97, (1, length)) for length in (3, 9, 4, 6, 2)]
    seeds = [None, None, None, 7, 11]

    def states():
        return [SimpleNamespace(request=SimpleNamespace(sampling=sampling), seen=ids,
                                generator=None if seed is None else torch.Generator().manual_seed(seed))
                for sampling, ids, seed in zip(settings, seen, seeds)]

    together, errors = Engine._sample(logits, states())
    alone = [next_tokens(logits[row:row + 1], state.seen, state.request.sampling, state.generator)
             for row, state in enumerate(states())]
    assert torch.equal(together, torch.cat(alone)) and errors == [None] * 5


def test_a_temperature_too_small_to_divide_by_is_greedy():
    torch.manual_seed(0)
    logits, seen = torch.randn(3, 97) * 3, torch.randint(0, 97, (3, 4))
    for temperature in (1e-40, 3.4e-38):  # logits / temperature overflow to inf, and softmax makes NaN of them
        assert torch.equal(next_tokens(logits, seen, Sampling(temperature=temperature)), logits.argmax(-1, keepdim=True))


def test_a_request_whose_sampling_fails_ends_alone_while_its_batch_goes_on(monkeypatch):
    import model.engine
    from model.engine import Engine, Request

    def failing(logits, seen, sampling, generator=None):  # B's (prompt [7]) rows, padded to 3 ids or more, fail
        if bool((seen[:, 0] == 7).any()) and seen.size(1) >= 3:
            raise RuntimeError("probability tensor contains nan (simulated)")
        return next_tokens(logits, seen, sampling, generator)

    monkeypatch.setattr(model.engine, "next_tokens", failing)
    engine = Engine(make_model(use_moe=False), eos_token_id=None, max_batch=2, context=64)
    tokens, ends, done = {"A": [], "B": []}, {}, threading.Event()

    def emitter(name):
        def emit(token, reason):
            tokens[name].append(token) if reason is None else ends.setdefault(name, reason)
            if len(ends) == 2:
                done.set()
        return emit
    with engine.condition:  # admitted together: one sampling, so one call samples both rows
        assert engine.submit(Request([5, 9], 8, Sampling(), emitter("A"), ignore_eos=True))
        assert engine.submit(Request([7], 8, Sampling(), emitter("B"), ignore_eos=True))
    assert done.wait(60)
    engine.close()
    assert ends == {"A": "length", "B": "error: RuntimeError: probability tensor contains nan (simulated)"}
    assert (len(tokens["A"]), len(tokens["B"])) == (8, 2)


def test_a_request_cancelled_while_it_waits_leaves_the_queue_at_once():
    from model.engine import Engine, Request

    engine = Engine(make_model(use_moe=False), eos_token_id=None, max_batch=1, max_queue=1, context=4096)
    ends, started = [], threading.Event()

    def emit(token, reason):
        started.set() if reason is None else ends.append(reason)
    assert engine.submit(Request([5, 9], 10**6, Sampling(), emit, ignore_eos=True))  # holds the one slot
    assert started.wait(60)
    waiting = Request([7], 4, Sampling(), emit)
    assert engine.submit(waiting)
    engine.cancel(waiting)  # its client gave up
    assert ends == ["cancelled"]  # told at once, though no slot has freed
    assert engine.submit(Request([7], 4, Sampling(), emit))  # and its place in the queue is free for another
    engine.close()


@pytest.mark.parametrize("use_moe, graphed, bf16", [(False, False, False), (True, False, False), (False, True, False),
                                                   (False, False, True), (False, True, True)])
def test_a_stream_reuses_its_decoder_and_decodes_with_the_weights_the_model_has_now(use_moe, graphed, bf16):
    """What lets a compiled step (on CUDA its captured graph) serve every later call: one decoder per model while
    the shape holds, computing with the model's own weight tensors (under bf16 autocast, copies made anew each
    stream: after an optimizer step too; once a CUDA graph reads them, `graphed` here, in place); the tokens are
    those of a decoder made afresh."""
    model = make_model(use_moe)
    prompt = torch.randint(3, 97, (2, 5))
    sampling = Sampling(temperature=0.8)

    def sampled(model, prompt, length=12):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return fast_generate(model, prompt, length, sampling, generator=torch.Generator().manual_seed(0))

    first = sampled(model, prompt)
    decoder = DECODERS[model]
    decoder.static = graphed

    def addresses():  # of the matrices (the norms' gains are the parameters in any dtype)
        return [t.data_ptr() for t in tensors_in((decoder.blocks, decoder.head, decoder.stacked)) if t.dim() > 1]

    taken = addresses()
    parameters = {p.data_ptr() for p in model.parameters()}
    assert all((address in parameters) != bf16 for address in taken)  # the parameters themselves, or copies
    longer = torch.randint(3, 97, (2, 9))
    assert torch.equal(sampled(model, longer, 30), sampled(copy.deepcopy(model), longer, 30))
    assert DECODERS[model] is decoder  # another length within the same cache length (CACHE_STEP)
    assert torch.equal(sampled(model, prompt), first)  # its cache cleared between streams
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)  # as the trainer: no version bump
    model.train()
    model(prompt, labels=prompt).loss.backward()
    optimizer.step()
    model.eval()
    fresh = copy.deepcopy(model)  # the same weights, no decoder yet
    assert torch.equal(sampled(model, prompt), sampled(fresh, prompt))
    assert not torch.equal(sampled(model, prompt), first)  # the step changed what it says
    assert DECODERS[model] is decoder and (addresses() == taken) == (graphed or not bf16)
    sampled(model, torch.randint(3, 97, (3, 5)))  # another batch: a decoder of its own
    assert DECODERS[model] is not decoder


FAULTS_OF_A_FRESH_BUFFER = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from trainer.loop import keep_freed_memory

def faults():  # minor page faults taken by a 128 MB buffer made, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(1 << 25).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
plain = faults()
keep_freed_memory()
faults(), faults()  # the heap grows to hold the buffer (an aligned request can need more than one freed chunk)
print(plain, max(faults() for _ in range(3)))  # from then on each buffer reuses freed memory
"""


def test_a_cpu_run_reuses_freed_large_buffers_instead_of_faulting_them_in_again():
    """What a training step frees (the logits and their gradients are buffers of 100 MB and more) is reused by
    the next step, not handed back to the kernel and faulted in page by page again. Counted in page faults, in a
    process of its own: the setting lasts for the process."""
    import subprocess
    import sys

    code = FAULTS_OF_A_FRESH_BUFFER.format(root=str(Path(__file__).resolve().parents[1]))
    plain, kept = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split())
    assert plain > 20_000  # 32,768 pages of 4 KB, each faulted in again
    assert kept < plain / 20
