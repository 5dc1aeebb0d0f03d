"""GPU paths of `automodel distill`: bf16 teacher, bf16-autocast student, the KD loss on bf16
CUDA logits. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_kd_loss_on_cuda_bf16_matches_the_fp32_reference():
    import torch.nn.functional as F

    from automodel_cli.components.loss.kd import kd_loss

    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(4, 64, 32000, device="cuda", generator=generator).bfloat16().requires_grad_()
    teacher = torch.randn(4, 64, 32000, device="cuda", generator=generator).bfloat16()
    labels = torch.randint(0, 32000, (4, 64), device="cuda", generator=generator)
    labels[:, :20] = -100
    got = kd_loss(student, teacher, labels, temperature=2.0, chunk_elements=2**22)
    mask = labels[:, 1:] != -100
    log_q = F.log_softmax(student[:, :-1].float()[mask] / 2.0, -1)
    log_p = F.log_softmax(teacher[:, :-1].float()[mask] / 2.0, -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / mask.sum()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    got_grad, = torch.autograd.grad(got, student)
    expected_grad, = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got_grad, expected_grad)


def test_distill_on_gpu_keeps_the_teacher_in_bf16(cli, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from automodel_cli.assets import demo_dir

    teacher = tmp_path / "teacher"
    config = AutoConfig.from_pretrained(demo_dir())
    config.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(demo_dir()).save_pretrained(teacher)
    run = tmp_path / "run"
    result = cli("distill", "demo", "-o", str(run), f"distill.teacher_path={teacher}", "distill.kd_weight=1.0",
                 "model.config.num_hidden_layers=1", "train.max_steps=30", "train.eval_every_steps=null",
                 "train.eval_batches=2", "logging.progress=false")
    assert result.exit_code == 0, result.stderr
    assert "cuda, float32 weights, bfloat16 autocast" in result.stdout
    assert "frozen, bfloat16" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_kl"] < summary["before"]["eval_kl"]
