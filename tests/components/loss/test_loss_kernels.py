"""Optional kernel losses (liger_linear_ce, te_ce): registered without importing their packages;
selecting one where it cannot run is a clear usage error (exit 2, the extra to install, no
traceback); with the package they match masked_ce: liger's Triton kernels on CPU through
Triton's interpreter (liger-kernel is in the test extra), both on a CUDA machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from automodel_cli.components.loss import kernels
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.errors import UserError
from conftest import run_cli
from tolerances import f32_tol

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_kernel_losses_are_listed_without_importing_their_packages():
    code = (
        "import sys\n"
        "from automodel_cli.plugin_host import get_registries\n"
        "losses = get_registries().losses\n"
        "print(sorted(losses.names()))\n"
        "print(losses.get('liger_linear_ce').load().kind, losses.get('te_ce').load().rows)\n"
        "print([m for m in ('liger_kernel', 'transformer_engine', 'triton') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, flags, imported = out.strip().splitlines()
    assert {"masked_ce", "chunked_ce", "linear_ce", "liger_linear_ce", "te_ce"} <= set(eval(names))
    assert flags == "fused True"
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
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(UserError, match="need a CUDA GPU; this run is on cpu"):
        check(torch.device("cpu"))
    check(torch.device("cuda"))  # nothing missing: no error


def test_triton_interpreter_lets_liger_but_not_te_run_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="set TRITON_INTERPRET=1"):
        kernels.check_liger(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.check_liger(torch.device("cpu"))
    with pytest.raises(UserError, match="need a CUDA GPU"):  # Transformer Engine is CUDA C++
        kernels.check_te(torch.device("cpu"))
    with pytest.raises(UserError, match="this run is on mps"):
        kernels.check_liger(torch.device("mps"))


def test_calling_a_kernel_loss_on_cpu_raises_the_same_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
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
    result = run_cli("finetune", "demo", f"loss.name={name}", "-o", str(tmp_path / "run"), "logging.progress=false",
                     env={"TRITON_INTERPRET": "0"})
    assert result.exit_code == 2
    assert f"loss.name={name}" in result.stderr and "Traceback" not in result.stderr
    assert ("automodel-cli[" in result.stderr) or ("CUDA GPU" in result.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


# ------------------------------------------------- liger on CPU, through Triton's interpreter
# TRITON_INTERPRET must be set before Triton is imported, so these run in fresh processes.
INTERPRETER = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (pip install -e '.[test]')")

LIGER_VS_MASKED_CE = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    from automodel_cli.components.loss.kernels import liger_linear_cross_entropy
    from automodel_cli.components.loss.masked_ce import masked_cross_entropy
    from automodel_cli.components.loss.targets import shift_labels

    def value_and_grads(fn, hidden, weight, labels):
        hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(hidden, weight, labels)
        loss.backward()
        return [loss.detach(), hidden.grad, weight.grad]

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 24, 32, generator=g), torch.randn(300, 32, generator=g) * 0.1
    labels = torch.randint(0, 300, (2, 24), generator=g)
    labels[0, :7] = -100
    labels[1, -3:] = -100
    want = value_and_grads(lambda h, w, y: masked_cross_entropy(F.linear(h, w), y, 50), hidden, weight, labels)
    cases = {
        "batch layout": (hidden, labels),                              # [B, T, H] + unshifted labels
        "rows layout": (hidden[:, :-1].reshape(-1, 32), shift_labels(labels)[:, :-1].reshape(-1)),
    }
    result = {}
    for name, (h, y) in cases.items():
        got = value_and_grads(lambda h_, w, y_: liger_linear_cross_entropy(h_, w, y_, 50), h, weight, y)
        if name == "rows layout":  # compare the hidden gradient on the rows that exist
            want_h = want[1][:, :-1].reshape(-1, 32)
        else:
            want_h = want[1]
        # (difference, scale of the expected values) for the loss and both gradients
        result[name] = [[float((g - w).abs().max()), float(w.abs().max())]
                        for g, w in zip(got, [want[0], want_h, want[2]])]
    print(json.dumps(result))
""")


@needs_liger
def test_liger_linear_ce_matches_masked_ce_in_the_triton_interpreter():
    """The wrapper's layouts, ignore index and normaliser against masked_ce, gradients included,
    with liger's real Triton kernels (interpreted on CPU)."""
    import os

    proc = subprocess.run([sys.executable, "-c", LIGER_VS_MASKED_CE], capture_output=True, text=True,
                          env={**os.environ, **INTERPRETER}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"batch layout", "rows layout"}
    for name, compared in result.items():
        assert compared[0][1] > 1.0, name  # a real loss (sum over ~38 tokens / 50), not zero
        for what, (difference, scale) in zip(("loss", "hidden grad", "weight grad"), compared):
            # the head's matmul over H=32, the softmax over V=300, the 48 positions; cross-entropy's
            # five rounding steps (tests/tolerances.py)
            rtol, atol = f32_tol(scale, terms=32 + 300 + 48, depth=5)
            assert difference <= atol + rtol * scale, (name, what, difference, scale)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["loss"], row["grad_norm"]) for row in rows if "grad_norm" in row]


@needs_liger
def test_finetune_with_liger_in_the_triton_interpreter_matches_linear_ce(tmp_path):
    """`loss.name=liger_linear_ce` end to end: the recipe hands liger the LM head's weight and
    the trained positions' hidden states, and training follows linear_ce step for step."""
    common = ("finetune", "demo", "train.max_steps=3", "logging.progress=false")
    liger = run_cli(*common, "loss.name=liger_linear_ce", "-o", str(tmp_path / "liger"), env=INTERPRETER)
    assert liger.exit_code == 0, liger.stderr
    plain = run_cli(*common, "loss.name=linear_ce", "-o", str(tmp_path / "plain"), env={"OMP_NUM_THREADS": "1"})
    assert plain.exit_code == 0, plain.stderr
    got, want = _losses(tmp_path / "liger"), _losses(tmp_path / "plain")
    assert len(got) == len(want) == 3
    # Three optimizer steps apart from rounding: relative, since each step feeds the last step's
    # rounding differences forward (the gradient norm, a difference-sensitive sum, gets more room).
    for (loss, grad_norm), (loss_ref, grad_norm_ref) in zip(got, want):
        assert loss == pytest.approx(loss_ref, rel=1e-5) and grad_norm == pytest.approx(grad_norm_ref, rel=1e-4)
    assert (tmp_path / "liger" / "final" / "model.safetensors").exists()


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
