"""Stage 1: next-token pretraining on {"text": ...} jsonl, from random init (or --init_from).

    python 1-pretrain.py --config configs/tiny.json            # CPU demo size
    python 1-pretrain.py --model_type moe --config configs/moe.json
"""

from dataset import PretrainDataset
from trainer import Stage, run_cli, train_stage

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="pretrain",
        description=__doc__,
        dataset_class=PretrainDataset,
        default_data="data/pretrain.jsonl",
        default_val="data/pretrain_val.jsonl",
    )))
