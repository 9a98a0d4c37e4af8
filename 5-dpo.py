"""Stage 5: direct preference optimisation on {"chosen": [messages], "rejected": [messages]} jsonl.

Starts from --init_from or the matching SFT checkpoint, which must exist; that starting model,
frozen, is the reference. Loss per pair: -log sigmoid(beta * [(log p(chosen) - log p_ref(chosen))
- (log p(rejected) - log p_ref(rejected))]), log-probabilities summed over each final answer.

    python 5-dpo.py --config configs/tiny.json --learning_rate 1e-4   # far below pretraining's rate
"""

from dataset import PreferenceDataset
from trainer import DirectPreference, Stage, load_flagged, run_cli, train_stage
from trainer.objectives import add_dpo_flags

if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="dpo",
        description=__doc__,
        dataset=PreferenceDataset,
        default_data="data/dpo.jsonl",
        default_val="data/dpo_val.jsonl",
        start_from="sft",
        start_required=True,
        add_flags=add_dpo_flags,
        make_objective=lambda model, args, start, tokenizer: DirectPreference(load_flagged(start, args), args.beta,
                                                                              start),
    )))
