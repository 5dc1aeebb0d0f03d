"""A CUDA FSDP2 checkpoint (NCCL): exact round trip on the GPU, then loaded on the CPU with no
process group and consolidated. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from test_checkpoint_distributed import torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_checkpoint_round_trip_and_cpu_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint
    from automodel_cli.components.checkpoint.consolidate import consolidate

    run_dir = tmp_path / "run"
    [result] = torchrun(1, "cuda", str(run_dir), cpu_only=False)
    assert result["state_mismatches"] == []
    assert result["after_load"] == result["after_save"]  # the CUDA generator was restored
    # two steps from the same state; CUDA kernels may reduce in another order (relative, as for
    # any trajectory)
    assert result["resumed_next"] == pytest.approx(result["next"], rel=1e-5)

    reference = torch.load(run_dir / "reference.pt", weights_only=True)
    consolidate(run_dir, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cpu_model = LlamaForCausalLM(exported.config).eval()
    load_checkpoint(find_checkpoint("auto", run_dir), model=cpu_model, optimizer=None, scheduler=None)
    for name, tensor in cpu_model.state_dict().items():
        if f"model.{name}" in reference:
            assert torch.equal(tensor, reference[f"model.{name}"]), name
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, cpu_model(ids).logits, rtol=0, atol=0)
