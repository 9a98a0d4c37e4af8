"""Stage 1: next-token pretraining on {"text": ...} jsonl, from random init (or --init_from).

Its recipe (trainer.PRETRAIN_DEFAULTS, measured by scripts/bench_learning.py): the bigram warm start (the embedding,
final norm and head first fitted to the data's bigram counts), then Muon for the matrices inside the blocks and
AdamW for the rest at lr 6e-3, warmup-stable-decay; rows packed best-fit with whole samples (`--pack shared
--pack_fit best`); an untied head, the fitted embedding and head trained on at 3e-3 and 1e-3. `--bigram_steps 0`
starts cold (the embedding then at 0.1, the head at the run's rate).

    python 1-pretrain.py --config configs/tiny.json            # CPU demo size
    python 1-pretrain.py --model_type moe --config configs/moe.json
"""

from dataset import PretrainDataset
from trainer import PRETRAIN_DEFAULTS, Stage, run_cli, train_stage

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="pretrain",
        description=__doc__,
        dataset=PretrainDataset,
        packs=True,
        z_loss=True,
        default_data="data/pretrain.jsonl",
        default_val="data/pretrain_val.jsonl",
        defaults=PRETRAIN_DEFAULTS,
    )))
