"""Stage 7: distil a teacher into a student: (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T).

The teacher is any checkpoint 3-eval.py loads (a tinymind .pth/.safetensors or a Hugging Face directory,
dense or MoE, with its config beside it), frozen; it must share the student's tokenizer (a student from random
init takes the teacher's). The student starts from --init_from or random init with the shape the flags give.
Pretrain-format jsonl trains on every token, SFT-format on the answers.

    python 7-distill.py --config configs/tiny.json --hidden_size 64 --num_hidden_layers 2 \\
        --teacher output/sft_dense/sft_128.pth --data_path data/sft.jsonl
"""

from dataset import text_or_chat_dataset, tokenizer_beside
from trainer import Distillation, Stage, UserError, load_for_use, run_cli, train_stage
from trainer.objectives import add_distill_flags, check_distill_flags


def distillation(student, args, start, tokenizer):
    # With its own tokenizer, or (none saved with it) the student's; the flags are the student's shape.
    teacher, teacher_tokenizer = load_for_use(args.teacher, tokenizer_path=None if tokenizer_beside(args.teacher)
                                              else args.tokenizer_path)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"--teacher {args.teacher} has a vocabulary of {teacher.config.vocab_size} tokens but the "
                        f"student has {student.config.vocab_size}: distillation needs one vocabulary (one tokenizer)")
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--teacher {args.teacher} was trained with the tokenizer {teacher_tokenizer.name_or_path}, the "
                        f"student trains with {tokenizer.name_or_path}: distillation needs one tokenizer; pass "
                        f"--tokenizer_path {teacher_tokenizer.name_or_path}")
    return Distillation(teacher, args.alpha, args.distill_temperature, args.teacher)


if __name__ == "__main__":
    run_cli(lambda: train_stage(Stage(
        name="distill",
        description=__doc__,
        dataset=text_or_chat_dataset,
        packs=True,
        default_data="data/sft.jsonl",
        default_val="data/sft_val.jsonl",
        add_flags=add_distill_flags,
        check_flags=check_distill_flags,
        make_objective=distillation,
        tokenizer_from=lambda args: args.teacher,  # a student from random init speaks the teacher's tokenizer
    )))
