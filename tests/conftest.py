"""What the tests share: tiny model configs, tiny data files, the tokenizer, and a runner for the stage
scripts as a user runs them. Test files import the helpers with `from conftest import ...`."""

import contextlib
import inspect
import io
import json
import os
import random
import runpy
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

# Read when the libraries are imported, so before they are: no hub, no progress bars (the stage scripts run in this
# process too, see run_stage).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy
import openai
import pytest
import torch
import uvicorn

from dataset import PretrainDataset, SFTDataset, load_tokenizer
from filelock import FileLock
from model import TinyMindConfig, TinyMindForCausalLM, load_model, save_weights
from scripts.serve import create_app
from trainer import PRETRAIN_DEFAULTS, PRETRAIN_SHORT_PLAN, Stage
from trainer.tools import load_tools

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
         "--num_key_value_heads", "2", "--max_seq_len", "48"]
TINY = [*MODEL, "--batch_size", "4", "--log_interval", "1"]  # flags of the training stages

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "To be, or not to be, that is the question.",
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "All the world's a stage, and all the men and women merely players.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
]

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Goodbye!"}],
    [{"role": "user", "content": "“春眠不觉晓”的下一句是？"}, {"role": "assistant", "content": "处处闻啼鸟。"}],
]


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def pretrain_stage():
    """1-pretrain.py's Stage: its defaults and its short-plan rule."""
    return Stage(name="pretrain", description="", dataset=PretrainDataset, default_data="data/pretrain.jsonl",
                 default_val="", defaults=PRETRAIN_DEFAULTS, short_plan=PRETRAIN_SHORT_PLAN)


def pretrain_file(directory, copies=4):
    return write_jsonl(Path(directory) / "pretrain.jsonl", [{"text": t} for t in TEXTS * copies])


def sft_file(directory, copies=4):
    return write_jsonl(Path(directory) / "sft.jsonl", [{"conversations": c} for c in CONVERSATIONS * copies])


def run_stage(script, *args, cwd, check=True, timeout=300, env=None):
    """Run `python <script> args` (or `python -m module args` for script "-m") in `cwd` as a user would; returns a
    CompletedProcess. It runs in this process (the script's file executed as `__main__`, with its argv, working
    folder, stdout, stderr, warnings and exit code its own) unless `env` is given: settings read from the
    environment when a library is imported need a fresh interpreter (`timeout` applies to that one). A fresh
    interpreter costs about 10 s of imports, most of a tiny stage run's time."""
    args = [str(arg) for arg in args]
    if env:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env or {})}
        command = [sys.executable, "-m", *args] if script == "-m" else [sys.executable, str(ROOT / script), *args]
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        result = run_in_this_process(script, args, cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# What a fresh interpreter filters (Python's defaults), for the warnings of a script run in this process.
FRESH_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                         ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                         ("ignore", ResourceWarning, None)]


def run_in_this_process(script, args, cwd):
    """`run_stage`'s script in this process; the test's working folder, argv, random states, warning filters
    and torch.compile's caches come back as they were. What differs from a fresh interpreter: messages of
    loggers made at import (transformers') go to the real stderr, and a `*_once` warning shows once per test
    process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = os.getcwd(), sys.argv, torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    returncode = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(FRESH_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module or "")
            # runpy's note that a `-m` module was imported before: by an earlier test, not by the script
            warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                if script == "-m":
                    sys.argv = args
                    runpy.run_module(args[0], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [str(ROOT / script), *args]
                    runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exit:
                if isinstance(exit.code, int) or exit.code is None:
                    returncode = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
                    returncode = 1
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        torch.set_rng_state(saved[2])
        random.setstate(saved[3])
        numpy.random.set_state(saved[4])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        torch._dynamo.reset()  # a compiled run's graphs count towards no later run's recompile limit
    command = [sys.executable, *(["-m"] if script == "-m" else [str(ROOT / script)]), *args]
    return subprocess.CompletedProcess(command, returncode, stdout.getvalue(), stderr.getvalue())


def tiny_config(**overrides):
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return TinyMindConfig(**{**fields, **overrides})


def moe_config(**overrides):
    return tiny_config(**{**dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
                          **overrides})


def make_model(use_moe, seed=0):
    torch.manual_seed(seed)
    return TinyMindForCausalLM(moe_config() if use_moe else tiny_config()).eval()


# ---- `make test-fast`: the unit tests, without the ones that run whole programs --------------------------

WHOLE_PROGRAMS = {"run_stage", "subprocess", "Server", "torchrun"}


def runs_whole_programs(function, module_globals, seen=None):
    """Whether `function`, or a helper of its module it calls, starts a stage script, torchrun or a server."""
    seen = set() if seen is None else seen
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = set(code.co_names) | {name for const in code.co_consts if inspect.iscode(const) for name in const.co_names}
    if names & WHOLE_PROGRAMS:
        return True
    return any(runs_whole_programs(module_globals[name], module_globals, seen)
               for name in names if inspect.isfunction(module_globals.get(name)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a stage script, torchrun or a server (left out by make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        fixtures = getattr(item, "fixturenames", ())
        fixture_functions = [definition.func for name in fixtures
                             for definition in item._fixtureinfo.name2fixturedefs.get(name, ())]
        if function is not None and any(runs_whole_programs(f, f.__globals__)
                                        for f in (function, *fixture_functions)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


# ---- a tiny model that calls a tool ------------------------------------------------------------------

QUESTION = "What is 17*23?"
TOOL_CHAT = [{"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "reasoning_content": "Use the calculator.",
         "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "17*23"}}}]},
        {"role": "tool", "content": "391"},
        {"role": "assistant", "content": "17*23 = 391."}]
GREETING = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def shared_by_workers(tmp_path_factory, worker_id, name, build):
    """A file `build(path)` writes once per test session, shared by pytest-xdist's workers (each has a session of
    its own): the first to get here builds it under a lock while the others wait, then all read it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker_id != "master" else root  # the run's folder, above each worker's own
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            build(path)
    return path


def shared_run(tmp_path_factory, worker_id, name, script, *args, copies=4):
    """A folder holding the tiny data files (data/pretrain.jsonl, data/sft.jsonl, `copies` of each text), one run of
    `script args` in it (its output/) and the run's stdout (stdout.txt), made once per test session for every test
    that starts from it. Tests copy its output (`copy_output`) rather than write into it."""
    def build(stdout):
        folder = stdout.parent
        shutil.rmtree(folder / "output", ignore_errors=True)  # what a build that failed may have left
        pretrain_file(folder / "data", copies)
        sft_file(folder / "data", copies)
        stdout.write_text(run_stage(script, *args, cwd=folder).stdout)  # written last: the run finished

    return shared_by_workers(tmp_path_factory, worker_id, f"{name}/stdout.txt", build).parent


def copy_output(run, directory):
    """A shared run's output/ (its checkpoints, logs and resume states) copied into `directory`."""
    shutil.copytree(run / "output", Path(directory) / "output", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, worker_id):
    """One step of tiny dense pretraining: output/pretrain_dense/pretrain_64.pth and its run folder."""
    return shared_run(tmp_path_factory, worker_id, "pretrained", "1-pretrain.py", *TINY, "--max_steps", "1")


@pytest.fixture(scope="session")
def sft_trained(tmp_path_factory, worker_id):
    """Two steps of tiny dense SFT from random init: output/sft_dense/sft_64.pth, where the post-training stages
    start."""
    return shared_run(tmp_path_factory, worker_id, "sft_trained", "2-sft.py", *TINY, "--max_steps", "2")


@pytest.fixture(scope="session")
def tool_caller(tmp_path_factory, worker_id):
    """A tiny model trained until it says TOOL_CHAT's turns (with the calculator offered) and GREETING's word for word:
    every token of them its most likely one, at probability 0.95 or more."""
    path = shared_by_workers(tmp_path_factory, worker_id, "tool_caller.pth", train_tool_caller)
    return path, load_model(path).eval()


def train_tool_caller(path):
    tokenizer, tools = load_tokenizer(), load_tools("calculator")
    data = SFTDataset(write_jsonl(path.with_suffix(".jsonl"), [{"conversations": TOOL_CHAT, "tools": tools.schemas},
                                                            {"conversations": GREETING}]), tokenizer, 1024)
    batch = data.collate([data[0], data[1]])
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    learned = batch.loss_mask.bool()
    for _ in range(600):
        logits = model(batch.input_ids).logits[learned]
        if logits.softmax(-1).gather(1, batch.targets[learned][:, None]).min() >= 0.95:
            break
        loss = torch.nn.functional.cross_entropy(logits, batch.targets[learned])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_weights(model.state_dict(), model.config, path)


# ---- a server of scripts/serve.py's app -------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app's app under uvicorn on a free local port, in a thread of this process."""

    def __init__(self, model, tokenizer, **options):
        self.port = free_port()
        self.app = app = create_app(model, tokenizer, "tiny", **options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def greedy(client, prompt, max_tokens=16, **extra):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **extra)
