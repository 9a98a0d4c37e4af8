"""Stage 1: next-token pretraining on {"text": ...} jsonl, from random init (or --init_from).

Its recipe: Muon for the matrices inside the blocks and AdamW for the rest, at lr 2e-3, warmup-stable-decay
(scripts/bench_learning.py measures it against AdamW with cosine; `--optimizer adamw --learning_rate 5e-4
--schedule cosine` is the earlier recipe).

    python 1-pretrain.py --config configs/tiny.json            # CPU demo size
    python 1-pretrain.py --model_type moe --config configs/moe.json
"""

from dataset import PretrainDataset
from trainer import Stage, run_cli, train_stage

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="pretrain",
        description=__doc__,
        dataset=PretrainDataset,
        packs=True,
        z_loss=True,
        default_data="data/pretrain.jsonl",
        default_val="data/pretrain_val.jsonl",
        defaults={"optimizer": "muon", "learning_rate": 2e-3, "schedule": "wsd"},
    )))
