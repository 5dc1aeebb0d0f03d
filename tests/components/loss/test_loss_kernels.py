"""Optional kernel losses (liger_linear_ce, te_ce): registered without importing their packages;
selecting one where it cannot run is a clear usage error (exit 2, the extra to install, no
traceback); on a CUDA machine with the package they match masked_ce."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from automodel_cli.components.loss import kernels
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.errors import UserError
from conftest import run_cli

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_kernel_losses_are_listed_without_importing_their_packages():
    code = (
        "import sys\n"
        "from automodel_cli.plugin_host import get_registries\n"
        "losses = get_registries().losses\n"
        "print(sorted(losses.names()))\n"
        "print(losses.get('liger_linear_ce').load().fused, losses.get('te_ce').load().rows)\n"
        "print([m for m in ('liger_kernel', 'transformer_engine', 'triton') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, flags, imported = out.strip().splitlines()
    assert {"masked_ce", "chunked_ce", "linear_ce", "liger_linear_ce", "te_ce"} <= set(eval(names))
    assert flags == "True True"
    assert imported == "[]"


@pytest.mark.parametrize("check, extra, package", [(kernels.check_liger, "liger", "liger-kernel"),
                                                   (kernels.check_te, "te", "transformer-engine")])
def test_missing_package_names_the_extra(monkeypatch, check, extra, package):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as caught:
        check(torch.device("cuda"))
    message = str(caught.value)
    assert package in message and f"pip install 'automodel-cli[{extra}]'" in message
    assert "loss.name=linear_ce" in message


@pytest.mark.parametrize("check", [kernels.check_liger, kernels.check_te])
def test_installed_package_without_cuda_says_so(monkeypatch, check):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(UserError, match="need a CUDA GPU; this run is on cpu"):
        check(torch.device("cpu"))
    check(torch.device("cuda"))  # nothing missing: no error


def test_calling_a_kernel_loss_on_cpu_raises_the_same_error():
    hidden = torch.randn(4, 8)
    with pytest.raises(UserError, match="liger"):
        kernels.liger_linear_cross_entropy(hidden, torch.randn(10, 8), torch.tensor([1, 2, 3, -100]))
    with pytest.raises(UserError, match="te_ce"):
        kernels.te_cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, -100]))


@pytest.mark.skipif(HAS_CUDA and HAS_LIGER and HAS_TE, reason="both kernels can run on this machine")
@pytest.mark.parametrize("name", ["liger_linear_ce", "te_ce"])
def test_finetune_with_an_unusable_kernel_loss_is_a_usage_error(tmp_path, name):
    if name == "liger_linear_ce" and HAS_CUDA and HAS_LIGER or name == "te_ce" and HAS_CUDA and HAS_TE:
        pytest.skip(f"{name} can run here")
    result = run_cli("finetune", "demo", f"loss.name={name}", "-o", str(tmp_path / "run"), "logging.progress=false")
    assert result.exit_code == 2
    assert f"loss.name={name}" in result.stderr and "Traceback" not in result.stderr
    assert ("automodel-cli[" in result.stderr) or ("CUDA GPU" in result.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


# ------------------------------------------------------------------------------------ GPU

def _case(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 128, generator=generator).cuda().to(dtype)
    weight = (torch.randn(1000, 128, generator=generator) * 0.05).cuda().to(dtype)
    labels = torch.randint(0, 1000, (2, 64), generator=generator).cuda()
    labels[0, :10] = -100
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach().float(), hidden.grad.float(), weight.grad.float()


def _reference(hidden, weight, labels):
    return masked_cross_entropy(F.linear(hidden, weight), labels, 100)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_linear_ce_on_gpu(dtype, tol):
    from automodel_cli.components.loss.linear_ce import linear_cross_entropy

    case = _case(dtype)
    want = _value_and_grads(_reference, *case)
    got = _value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, 100, chunk_size=48), *case)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_LIGER), reason="needs a CUDA GPU and liger-kernel")
def test_liger_linear_ce_matches_masked_ce():
    case = _case(torch.float32)
    want = _value_and_grads(_reference, *case)
    got = _value_and_grads(lambda h, w, y: kernels.liger_linear_cross_entropy(h, w, y, 100), *case)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TE), reason="needs a CUDA GPU and Transformer Engine")
def test_te_ce_matches_masked_ce():
    case = _case(torch.float32)
    want = _value_and_grads(_reference, *case)
    got = _value_and_grads(lambda h, w, y: kernels.te_cross_entropy(F.linear(h, w), y, 100), *case)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
