"""The optimizer and schedule registries' built-ins: each optimizer trains the demo model, Muon
takes exactly the decoder layers' matrices, the schedules' curves, and the config checks."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from automodel_cli.assets import demo_dir
from automodel_cli.components.optim.build import build_optimizer, lr_multiplier, schedule_multiplier
from automodel_cli.components.optim.muon import ALGORITHM, hidden_matrices
from automodel_cli.errors import UserError
from conftest import one_line

OPTIM = dict(weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8)
#: A rate each optimizer makes clear progress with in a few steps on one repeated batch.
LR = {"adamw": 1e-2, "sgd": 0.5, "adafactor": 1e-2, "muon": 1e-2, "adamw8bit": 1e-2}


def demo_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir()))


def optimizer_for(model, name: str, lr: float = 1e-3, **options):
    return build_optimizer(model, SimpleNamespace(name=name, **OPTIM, **({name: options} if options else {})), lr)


@pytest.mark.parametrize("name", list(LR))
def test_each_builtin_optimizer_lowers_the_loss_of_the_demo_model(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    model = demo_model()
    optimizer = optimizer_for(model, name, LR[name])
    batch = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # log(64) = 4.16 at the start; every optimizer gets well below it on a batch it sees again.
    assert losses[-1] < losses[0] - 0.1, losses


def test_adamw_is_the_default_and_groups_weight_decay_as_before():
    model = demo_model()
    optimizer = build_optimizer(model, SimpleNamespace(**OPTIM), 1e-3)  # no optim.name: adamw
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["foreach"] and not decay["fused"] and decay["betas"] == (0.9, 0.999) and decay["eps"] == 1e-8


def test_muon_updates_exactly_the_decoder_layers_matrices():
    model = demo_model()
    optimizer = optimizer_for(model, "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    by_algorithm = {}
    for group in optimizer.param_groups:
        by_algorithm.setdefault(group[ALGORITHM], set()).update(names[id(p)] for p in group["params"])
    layers = model.config.num_hidden_layers
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = {f"model.layers.{i}.{p}.weight" for i in range(layers) for p in projections}
    assert by_algorithm["muon"] == expected
    assert by_algorithm["adamw"] == set(names.values()) - expected
    assert "model.embed_tokens.weight" in by_algorithm["adamw"] and "model.norm.weight" in by_algorithm["adamw"]
    muon_group = next(g for g in optimizer.param_groups if g[ALGORITHM] == "muon")
    assert muon_group["momentum"] == 0.95 and muon_group["ns_steps"] == 5 and muon_group["weight_decay"] == 0.01


def test_muon_under_lora_orthogonalises_the_adapters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(demo_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hidden = hidden_matrices(model)
    assert hidden and all(".lora_A." in n or ".lora_B." in n for n in hidden)
    assert len(hidden) == 2 * 2 * model.config.num_hidden_layers


def test_sgd_options_and_nesterov_without_momentum_is_refused():
    model = demo_model()
    group = optimizer_for(model, "sgd", momentum=0.5, nesterov=True).param_groups[0]
    assert group["momentum"] == 0.5 and group["nesterov"]
    with pytest.raises(UserError, match="optim.sgd.nesterov=true needs momentum"):
        optimizer_for(model, "sgd", momentum=0, nesterov=True)


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError) as error:
        optimizer_for(demo_model(), "adamw8bit")
    assert "bitsandbytes" in error.value.render() and "automodel-cli[bnb]" in error.value.render()


# ------------------------------------------------------------------------------- schedules
def optim_section(scheduler: str, **options) -> SimpleNamespace:
    return SimpleNamespace(scheduler=scheduler, warmup_steps=10, min_lr_ratio=0.1,
                           **({scheduler: options} if options else {}))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_builtin_schedules_are_the_same_curves(kind):
    multiplier = schedule_multiplier(optim_section(kind), 100)
    assert [multiplier(s) for s in range(100)] == \
        [lr_multiplier(s, warmup=10, total=100, kind=kind, min_ratio=0.1) for s in range(100)]


def test_wsd_curve_by_hand():
    linear = schedule_multiplier(optim_section("wsd", decay_fraction=0.2), 100)
    # Warmup over 10 steps, the peak until step 80, then down towards 0.1 over the last 20 steps.
    assert linear(0) == pytest.approx(0.1) and linear(9) == 1.0
    assert linear(10) == linear(50) == linear(79) == linear(80) == 1.0
    assert linear(90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert linear(99) == pytest.approx(0.1 + 0.9 * (1 / 20))
    cosine = schedule_multiplier(optim_section("wsd", decay_fraction=0.2, decay="cosine"), 100)
    assert cosine(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5))
    assert cosine(90) == pytest.approx(0.55)
    default = schedule_multiplier(optim_section("wsd"), 100)  # decay_fraction 0.1, linear
    assert default(89) == 1.0 and default(95) == pytest.approx(0.1 + 0.9 * 0.5)
    # The decay never reaches into the warmup.
    short = schedule_multiplier(SimpleNamespace(scheduler="wsd", warmup_steps=8, min_lr_ratio=0.0,
                                                wsd={"decay_fraction": 0.5}), 10)
    assert [short(s) for s in range(10)] == pytest.approx([(s + 1) / 8 for s in range(8)] + [1.0, 0.5])


# ----------------------------------------------------------------------------- the config
DEMO = ("config", "show", "demo")


@pytest.mark.parametrize("setting, phrases", [
    ("optim.name=adamww", ["`optim.name` names unknown optimizer `adamww`", "adamw"]),
    ("optim.scheduler=cosin", ["`optim.scheduler` names unknown learning-rate schedule `cosin`", "cosine", "wsd"]),
    ("optim.sgd.momentun=0.5", ["optim.sgd.momentum"]),
    ("optim.wsd.decay_fraction=0", ["optim.wsd.decay_fraction", "0 < x <= 1"]),
    ("optim.wsd.decay=exp", ["optim.wsd.decay", "linear", "cosine"]),
])
def test_bad_optimizer_and_schedule_settings_exit_2(cli, setting, phrases):
    result = cli(*DEMO, setting)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    message = one_line(result.stderr)
    assert all(phrase in message for phrase in phrases), message
    if "names unknown" in phrases[0]:
        assert "did you mean" in message.lower()


def test_chosen_entries_options_are_shown_with_their_defaults(cli):
    result = cli(*DEMO, "optim.name=sgd", "optim.scheduler=wsd", "optim.wsd.decay=cosine")
    assert result.exit_code == 0, result.stderr
    shown = one_line(result.stdout)
    assert "momentum: 0.9 # from defaults of optimizer sgd" in shown
    assert "decay_fraction: 0.1 # from defaults of learning-rate schedule wsd" in shown
    assert "muon" not in shown  # options of entries not chosen stay out


def test_sharded_adafactor_step_is_torchs_single_tensor_step():
    """The whole-matrix update ``ShardedAdafactor`` gives sharded parameters is torch's own
    single-tensor Adafactor, bit for bit, with the same state names and shapes (so checkpoints
    move between process counts); 2 processes are checked by the slow reshard runs."""
    from automodel_cli.components.optim.sharded_adafactor import ShardedAdafactor

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    reference = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    optimizer = ShardedAdafactor(ours, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for mine, other in zip(ours, theirs):
            mine.grad = torch.randn_like(mine)
            other.grad = mine.grad.clone()
        reference.step()
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    optimizer._update(param, group)
    for mine, other in zip(ours, theirs):
        assert torch.equal(mine, other)
        assert {k: v.shape for k, v in optimizer.state[mine].items()} == \
               {k: v.shape for k, v in reference.state[other].items()}
