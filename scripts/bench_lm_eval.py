"""Scoring speed: lm-eval through tinymind's model class against lm-eval's stock `hf` model on the Hugging Face export
of the same checkpoint, on the same tasks, in one process, interleaved, medians.

    python -m scripts.bench_lm_eval --config configs/tiny.json --out_dir output/demo     # the demo's SFT model

Examples per second of each task (a multiple-choice example is its four choices), and whether the two gave the
same accuracy.
"""

import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from lm_eval import simple_evaluate

from model.convert import export_hf
from trainer import run_cli
from trainer.benchmarks import TinyMindLM, accuracies, resolve_tasks
from trainer.flags import add_model_flags, new_parser, parse
from trainer.loading import add_checkpoint_flags, load_checkpoint_flags


def main(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    group = parser.add_argument_group("lm-eval bench")
    add_checkpoint_flags(group, "the model to score")
    group.add_argument("--tasks", default="tinymind_idiom_meaning,tinymind_char_reading,tinymind_next_line")
    group.add_argument("--limit", type=int, default=200)
    group.add_argument("--batch_size", type=int, default=16, help="both models' batch size")
    group.add_argument("--rounds", type=int, default=3)
    args = parse(parser, argv)
    model, tokenizer, checkpoint = load_checkpoint_flags(args)
    manager, tasks = resolve_tasks(args.tasks)
    with tempfile.TemporaryDirectory() as export:
        export_hf(model, export)
        tokenizer.save_pretrained(export)
        contenders = {
            "tinymind": lambda: TinyMindLM(model, tokenizer, args.batch_size, SimpleNamespace(dtype="float32", device="cpu")),
            "hf (export)": lambda: dict(model="hf", model_args={"pretrained": export, "dtype": "float32"},
                                        device="cpu", batch_size=args.batch_size),
        }
        seconds = {(name, task): [] for name in contenders for task in tasks}
        scored = {}
        for _ in range(args.rounds):
            for task in tasks:
                for name, make in contenders.items():
                    made = make()
                    options = made if isinstance(made, dict) else {"model": made}
                    started = time.perf_counter()
                    results = simple_evaluate(**options, tasks=[task], limit=args.limit, task_manager=manager,
                                              log_samples=False, verbosity="ERROR")
                    seconds[name, task].append(time.perf_counter() - started)
                    scored[name, task] = (accuracies(results)[task], results["n-samples"][task]["effective"])
    print(f"{checkpoint}: lm-eval {', '.join(tasks)}, at most {args.limit} examples each, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds")
    print(f"{'task':<24} {'model':<12} {'examples/s':>10} {'accuracy':>9} {'vs hf':>6}")
    for task in tasks:
        for name in contenders:
            accuracy, examples = scored[name, task]
            rate = examples / statistics.median(seconds[name, task])
            hf_rate = scored["hf (export)", task][1] / statistics.median(seconds["hf (export)", task])
            print(f"{task:<24} {name:<12} {rate:>10.1f} {accuracy:>9.3f} {rate / hf_rate:>5.2f}x")


if __name__ == "__main__":
    run_cli(main)
