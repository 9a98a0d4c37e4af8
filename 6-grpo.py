"""Stage 6: GRPO, reinforcement learning from rewards a program checks, on {"conversations", "answer"} prompts.

Starts from --init_from or the matching SFT checkpoint, which must exist (frozen, it is the reference
for --beta > 0). Each step samples --num_generations completions per prompt (--batch_size prompts per
micro-batch), rewards them (a line's own "reward" or --reward exact|numeric|contains, or your own
--reward_fn path.py:function taking (completion, answer) and returning a number), and follows each
group's relative advantages.

    python 6-grpo.py --config configs/tiny.json --batch_size 8 --learning_rate 3e-5
"""

from dataset import PromptDataset
from trainer import Stage, load_flagged, run_cli, train_stage
from trainer.grpo import GroupRelativePolicy, add_grpo_flags, check_grpo_flags


def grpo(model, args, start, tokenizer):
    reference = load_flagged(start, args) if args.beta > 0 else None
    return GroupRelativePolicy(reference, tokenizer, args, start)


if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="grpo",
        description=__doc__,
        dataset=PromptDataset,
        default_data="data/grpo.jsonl",
        default_val="data/grpo_val.jsonl",
        start_from="sft",
        start_required=True,
        add_flags=add_grpo_flags,
        same_run_flags=("num_generations", "num_iterations"),  # the shape of the rollouts a resume state holds
        check_flags=check_grpo_flags,
        make_objective=grpo,
        compiles_by_default=False,
    )))
