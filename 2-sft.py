"""Stage 2: supervised fine-tuning on {"conversations": [...]} jsonl, loss on the assistant's tokens only.

Starts from the matching pretrain checkpoint (output/pretrain_{type}/pretrain_{hidden}[_moe].pth);
when it is missing, says so and starts from random init.

    python 2-sft.py --config configs/tiny.json
"""

from dataset import SFTDataset
from trainer import Stage, run_cli, train_stage

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="sft",
        description=__doc__,
        dataset=SFTDataset,
        packs=True,
        z_loss=True,
        default_data="data/sft.jsonl",
        default_val="data/sft_val.jsonl",
        start_from="pretrain",
    )))
