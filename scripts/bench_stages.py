"""Time per step and peak memory of the post-training stages against full SFT, same model, same batch size.

    python -m scripts.bench_stages --config configs/tiny.json --checkpoint output/demo/sft_dense/sft_128.pth

Contenders, one optimizer step each through the real trainer (`Trainer.optimizer_step`), each against full
SFT on the same data:
    full SFT       --data_path (data/lora.jsonl), every weight trains
    LoRA           the same batch, only the adapters train (4-lora.py's defaults)
    distill        the same batch, plus a teacher's forward (a copy of the model stands in for the teacher)
    SFT on chosen  the chosen conversations of --batch_size pairs of --dpo_data (data/dpo.jsonl)
    DPO            those pairs: twice the rows, plus the reference's forward

The steps are timed round-robin in one process after warm-up, so a neighbour slowing the machine slows
all alike; the table gives medians and each contender's time as a ratio to full SFT. Memory is measured
for each contender alone in a fresh process: CUDA's max_memory_allocated, or on a CPU the resident-set
high-water mark above the process's size before the model was built.
"""

import argparse
import copy
import multiprocessing
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from dataset import PreferenceDataset, SFTDataset, collate, load_tokenizer
from model import TinyMindForCausalLM, load_model
from scripts.bench import proc_status_bytes, synchronize
from trainer import DirectPreference, Distillation, LanguageModeling
from trainer.run_folder import run_paths
from trainer.flags import add_model_flags, add_training_flags, model_config, new_parser, parse
from trainer.lora import add_lora_flags
from trainer.lora import with_adapters
from trainer.loop import Trainer

# contender → the full-SFT run on the same data it is compared with
CONTENDERS = {"full SFT": "full SFT", "LoRA": "full SFT", "distill": "full SFT", "SFT on chosen": "SFT on chosen",
              "DPO": "SFT on chosen"}


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_model_flags(parser)
    add_training_flags(parser, default_data="data/lora.jsonl")
    add_lora_flags(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--checkpoint", help="the SFT weights every contender starts from (default: random init)")
    group.add_argument("--dpo_data", default="data/dpo.jsonl")
    group.add_argument("--repeats", type=int, default=10, help="timed steps per contender, after --warmup")
    group.add_argument("--warmup", type=int, default=2)
    return parse(parser, argv)


def start_model(args):
    return load_model(args.checkpoint) if args.checkpoint else TinyMindForCausalLM(model_config(args))


def contender(name, args, tokenizer):
    """(trainer, its fixed micro-batch) for one contender."""
    torch.manual_seed(args.seed)
    model = start_model(args)
    paths = run_paths(f"bench_{name}", argparse.Namespace(**{**vars(args), "out_dir": tempfile.mkdtemp()}))
    if name == "DPO":
        data = PreferenceDataset(args.dpo_data, tokenizer, args.max_seq_len)
        objective = DirectPreference(copy.deepcopy(model), 0.1, None)
    elif name == "SFT on chosen":
        pairs = PreferenceDataset(args.dpo_data, tokenizer, args.max_seq_len)
        data, objective = ChosenAnswers(pairs), LanguageModeling()
    else:
        data = SFTDataset(args.data_path, tokenizer, args.max_seq_len)
        objective = Distillation(copy.deepcopy(model), 0.5, 2.0, None) if name == "distill" else LanguageModeling()
    if name == "LoRA":
        model = with_adapters(model, args)
    batch = data.collate([data[i] for i in range(args.batch_size)])
    return Trainer(model, data, objective, args, paths), batch


class ChosenAnswers(torch.utils.data.Dataset):
    """The chosen side of preference pairs as SFT samples (its final answer trained)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index][0]

    def collate(self, samples):
        return collate(samples, self.pairs.pad_id)


def step(trainer, batch):
    trainer.optimizer_step([batch])
    synchronize(trainer.args.device)


def peak_memory(name, args, results):
    """Runs in a fresh process: the peak bytes of three steps of one contender."""
    tokenizer = load_tokenizer(args.tokenizer_path)
    on_cuda = torch.device(args.device).type == "cuda"
    if not on_cuda:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        baseline = proc_status_bytes("VmRSS")
    trainer, batch = contender(name, args, tokenizer)
    for _ in range(3):
        step(trainer, batch)
    results.put(torch.cuda.max_memory_allocated() if on_cuda else proc_status_bytes("VmHWM") - baseline)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer_path)
    runs = {name: contender(name, args, tokenizer) for name in CONTENDERS}
    seconds = {name: [] for name in CONTENDERS}
    with tqdm(total=(args.warmup + args.repeats) * len(runs), desc="timing") as bar:
        for round_index in range(args.warmup + args.repeats):
            for name, (trainer, batch) in runs.items():
                started = time.perf_counter()
                step(trainer, batch)
                if round_index >= args.warmup:
                    seconds[name].append(time.perf_counter() - started)
                bar.update()
    context = multiprocessing.get_context("spawn")
    memory = {}
    for name in tqdm(CONTENDERS, desc="peak memory"):
        results = context.Queue()
        process = context.Process(target=peak_memory, args=(name, args, results))
        process.start()
        memory[name] = results.get()
        process.join()

    print(f"\n{args.checkpoint or 'random init'}, batch {args.batch_size} (DPO: pairs), {args.dtype}, {args.device}, "
          f"medians of {args.repeats}")
    print(f"{'stage':<14} {'s/step':>8} {'vs SFT':>7} {'peak memory':>12} {'vs SFT':>7} {'trainable':>10}")
    for name, (trainer, _) in runs.items():
        median, reference = statistics.median(seconds[name]), CONTENDERS[name]
        params = list(trainer.raw_model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
        print(f"{name:<14} {median:>8.3f} {median / statistics.median(seconds[reference]):>6.2f}x "
              f"{memory[name] / 2**20:>9.0f} MiB {memory[name] / memory[reference]:>6.2f}x {100 * trainable:>9.2f}%")


if __name__ == "__main__":
    main()
