"""7-distill.py: the loss against a hand computation, KL zero for a student equal to its teacher, one-line errors."""

import copy

import pytest
import torch

from dataset import SFTDataset
from model import TinyMindForCausalLM
from trainer import Distillation, Step

from conftest import MODEL, ROOT, TINY, pretrain_file, run_stage, sft_file, tiny_config, write_jsonl


@pytest.fixture
def batch(tmp_path, tokenizer):
    data = SFTDataset(sft_file(tmp_path, copies=1), tokenizer, max_length=48)
    return data.collate([data[i] for i in range(len(data))])  # uneven lengths: padding and prompt tokens masked


def teacher_and_student(seed=0):
    torch.manual_seed(seed)
    teacher = TinyMindForCausalLM(tiny_config(vocab_size=6400, hidden_size=128)).eval()
    student = TinyMindForCausalLM(tiny_config(vocab_size=6400)).train()
    return teacher, student


def test_loss_equals_a_hand_computation(batch):
    teacher, student = teacher_and_student()
    alpha, temperature = 0.3, 2.0
    units = int(batch.loss_mask.sum())
    result = Distillation(teacher, alpha, temperature, None)(student, batch, Step(units, 1, 1))
    with torch.no_grad():
        ce_sum, kl_sum = 0.0, 0.0
        for row in range(len(batch)):  # each sample alone, position by position
            length = int(batch.attention_mask[row].sum())
            ids, targets, mask = (t[row, :length] for t in (batch.input_ids, batch.targets, batch.loss_mask))
            s_logits, t_logits = student(ids[None]).logits[0], teacher(ids[None]).logits[0]
            for t in range(length):
                if mask[t]:
                    ce_sum += -s_logits[t].log_softmax(-1)[targets[t]].item()
                    p = (t_logits[t] / temperature).softmax(-1)
                    q = (s_logits[t] / temperature).softmax(-1)
                    kl_sum += (p * (p.log() - q.log())).sum().item()
    expected = (1 - alpha) * ce_sum / units + alpha * temperature**2 * kl_sum / units
    assert result.loss.item() == pytest.approx(expected, rel=1e-4)
    assert result.metrics["kl"].item() == pytest.approx(kl_sum / units, rel=1e-4)


def test_kl_and_its_gradient_vanish_when_the_student_is_the_teacher(batch):
    teacher, _ = teacher_and_student()
    student = copy.deepcopy(teacher).train()
    result = Distillation(teacher, 1.0, 2.0, None)(student, batch, Step(int(batch.loss_mask.sum()), 1, 1))
    assert abs(result.metrics["kl"].item()) < 1e-6
    result.loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_distillation_trains_a_smaller_student_packed_or_not_and_refuses_another_vocabulary(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    sft_file(tmp_path / "data")
    run_stage("2-sft.py", *TINY, "--hidden_size", 128, "--max_steps", 2, cwd=tmp_path)
    teacher = "output/sft_dense/sft_128.pth"
    # A preset with shape and stage keys goes through the flags one by one, --teacher's requirement aside.
    (tmp_path / "preset.json").write_text('{"hidden_size": 64, "alpha": 0.3}')
    result = run_stage("7-distill.py", *TINY, "--config", "preset.json", "--teacher", teacher, "--max_steps", 3,
                       cwd=tmp_path)
    assert "saved output/distill_dense/distill_64.pth" in result.stdout
    with open(tmp_path / "output/distill_dense/distill_64_log.csv") as f:
        assert f.readline().strip().startswith("step,tokens,seconds,loss,ce,kl,aux,")

    refused = run_stage("7-distill.py", *TINY, "--vocab_size", 7000, "--teacher", teacher, "--max_steps", 1,
                        "--out_dir", "other", cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --teacher {teacher} has a vocabulary of 6400 tokens but the student has 7000: distillation needs "
        "one vocabulary (one tokenizer)")
    packed = run_stage("7-distill.py", *TINY, "--teacher", teacher, "--pack", "isolated", "--max_steps", 1,
                       "--out_dir", "packed", cwd=tmp_path)
    assert "saved packed/distill_dense/distill_64.pth" in packed.stdout
    missing = run_stage("7-distill.py", *MODEL, cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "--teacher" in missing.stderr.strip().splitlines()[-1]


def test_a_student_speaks_its_teachers_tokenizer_and_another_is_refused_naming_it(tmp_path):
    from scripts import train_tokenizer

    (tmp_path / "data").mkdir()
    sft_file(tmp_path / "data")
    texts = [{"text": "To be, or not to be: that is the question. 床前明月光，疑是地上霜。"}] * 40
    train_tokenizer.fit(write_jsonl(tmp_path / "corpus.jsonl", texts), tmp_path / "fitted", vocab_size=400)
    run_stage("2-sft.py", *TINY, "--hidden_size", 128, "--tokenizer_path", "fitted", "--max_steps", 1, cwd=tmp_path)
    teacher = "output/sft_dense/sft_128.pth"
    result = run_stage("7-distill.py", *TINY, "--teacher", teacher, "--max_steps", 1, cwd=tmp_path)
    assert "tokenizer: output/sft_dense/tokenizer (" in result.stdout  # from random init: the teacher's
    refused = run_stage("7-distill.py", *TINY, "--teacher", teacher, "--tokenizer_path", str(ROOT / "model/tokenizer"),
                        "--max_steps", 1, "--out_dir", "other", cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --teacher {teacher} was trained with the tokenizer output/sft_dense/tokenizer, the student trains "
        f"with {ROOT / 'model/tokenizer'}: distillation needs one tokenizer; pass --tokenizer_path "
        "output/sft_dense/tokenizer")


def test_a_moe_teacher_from_a_hugging_face_directory_distils_on_pretraining_text(tmp_path):
    (tmp_path / "data").mkdir()
    pretrain_file(tmp_path / "data")
    torch.manual_seed(0)
    teacher = TinyMindForCausalLM(tiny_config(vocab_size=6400, hidden_size=128, use_moe=True, n_routed_experts=4,
                                              num_experts_per_tok=2, n_shared_experts=1))
    teacher.save_pretrained(tmp_path / "teacher")  # a Hugging Face directory, as 3-eval.py loads one
    result = run_stage("7-distill.py", *TINY, "--teacher", "teacher", "--data_path", "data/pretrain.jsonl",
                       "--max_steps", 2, cwd=tmp_path)
    assert "saved output/distill_dense/distill_64.pth" in result.stdout
    with open(tmp_path / "output/distill_dense/distill_64_log.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 3 and float(rows[1].split(",")[4]) > 0  # the kl column: the teacher's targets took part


def test_the_chunked_kl_equals_the_whole_vocabulary_one_with_its_gradient(monkeypatch):
    import torch.nn.functional as F

    from model.model import ChunkedCrossEntropy
    from trainer.objectives import soft_kl

    monkeypatch.setattr(ChunkedCrossEntropy, "CHUNK_ELEMENTS", 7 * 300)  # 7 positions a chunk
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 20, 300) * 3, (torch.randn(3, 20, 300) * 3).requires_grad_()
    weights = torch.rand(3, 20)
    expected = F.kl_div((student / 2.0).log_softmax(-1), (teacher / 2.0).log_softmax(-1), log_target=True,
                        reduction="none").sum(-1)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), student)
    kl = soft_kl(teacher, student, 2.0)
    grad, = torch.autograd.grad((kl * weights).sum(), student)
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
