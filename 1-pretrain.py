"""Stage 1: next-token pretraining on {"text": ...} jsonl, from random init (or --init_from).

Its recipe (trainer.PRETRAIN_DEFAULTS, measured by scripts/bench_learning.py): Muon for the matrices inside the
blocks and AdamW for the rest at lr 6e-3, warmup-stable-decay; rows packed best-fit with whole samples (`--pack
shared --pack_fit best`); an untied head, and the embedding at lr 0.1. A plan of at most 200 steps starts warm
(trainer.PRETRAIN_SHORT_PLAN: `--bigram_steps 40 --embedding_lr 0.003 --head_lr 1e-3`): the embedding, final norm
and head are first fitted to the data's bigram counts, which pays in short runs and loses in longer ones.

    python 1-pretrain.py --config configs/tiny.json            # CPU demo size
    python 1-pretrain.py --model_type moe --config configs/moe.json
"""

from dataset import PretrainDataset
from trainer import PRETRAIN_DEFAULTS, PRETRAIN_SHORT_PLAN, Stage, run_cli, train_stage

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
        short_plan=PRETRAIN_SHORT_PLAN,
    )))
