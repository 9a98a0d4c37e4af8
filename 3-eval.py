"""Stage 3: chat with a checkpoint (interactive, --prompt, --prompts_file) or report --ppl_data perplexity.

    python 3-eval.py --config configs/tiny.json --prompt "你好"
    python 3-eval.py --checkpoint output/pretrain_dense/pretrain_128.pth --ppl_data data/pretrain_val.jsonl
"""

from trainer import eval_stage, run_cli

if __name__ == "__main__":
    run_cli(eval_stage)
