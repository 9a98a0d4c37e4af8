"""Stage 4: LoRA, low-rank adapters (peft) trained on SFT-format jsonl on top of a frozen SFT model.

Starts from --init_from or the matching SFT checkpoint (output/sft_{type}/sft_{hidden}[_moe].pth),
which must exist. Writes the peft adapter folder output/lora_{type}/lora_{hidden}[_moe]/ (loadable
with peft.PeftModel.from_pretrained) and the merged model output/lora_{type}/lora_{hidden}[_moe].pth.

    python 4-lora.py --config configs/tiny.json
    python 3-eval.py --config configs/tiny.json --lora output/lora_dense/lora_128    # base + adapter, unmerged
"""

from dataset import SFTDataset
from trainer import Stage, run_cli, train_stage
from trainer.lora import add_lora_flags, check_lora_flags, with_adapters, write_lora

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="lora",
        description=__doc__,
        dataset=SFTDataset,
        packs=True,
        z_loss=True,
        default_data="data/lora.jsonl",
        default_val="data/lora_val.jsonl",
        start_from="sft",
        start_required=True,
        add_flags=add_lora_flags,
        same_run_flags=("lora_rank", "lora_alpha", "lora_targets"),  # the adapters the resume state holds
        check_flags=check_lora_flags,
        adapt_model=with_adapters,
        write_weights=write_lora,
    )))
