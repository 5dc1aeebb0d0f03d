"""Vision-language models on the model side: detected from config.json alone, built on the meta
device (checkpoint names as save_pretrained writes them) equal to ``from_pretrained`` bit for bit
with pixel values going through the vision tower, the vision tower (and optionally the projector)
frozen, LoRA on the language model only, and ``final/`` (full, LoRA, merged) and consolidated
checkpoints that load with ``AutoModelForImageTextToText`` to the same logits. Tiny Qwen2-VL and
Gemma 3 models from tests/vlm_models.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_materialize import build  # noqa: F401 (same build_model call as the text-only tests)
from vlm_models import make_vlm, save_vlm, vlm_inputs, vlm_logits

from automodel_cli.components.models import vlm
from automodel_cli.components.models.loading import load_model
from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve

ARCHS = ["qwen2_vl", "gemma3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {arch: save_vlm(root / arch, arch) for arch in ARCHS}


def pretrained(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


# ------------------------------------------------------------------------------ detection
def test_a_vlm_is_detected_from_config_json_alone(saved):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Gemma3TextConfig, LlamaConfig

    for arch in ARCHS:
        config_json = json.loads((saved[arch] / "config.json").read_text())
        assert vlm.is_vision_language(config_json), arch
        assert vlm.auto_class(config_json) is AutoModelForImageTextToText
    assert not vlm.is_vision_language(LlamaConfig())
    assert not vlm.is_vision_language(Gemma3TextConfig())  # text-only Gemma 3
    assert not vlm.is_vision_language({"model_type": "llava"})  # no vision tower configured
    assert vlm.is_vision_language({"model_type": "custom", "vision_config": {},
                                   "auto_map": {"AutoModelForImageTextToText": "modeling_x.X"}})
    assert vlm.auto_class(LlamaConfig()) is AutoModelForCausalLM


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("arch", ARCHS)
def test_meta_build_equals_from_pretrained_with_images(saved, arch):
    """The checkpoint says ``model.layers.*``/``visual.*`` (Qwen2-VL) or ``language_model.model.*``
    (Gemma 3), the modules ``model.language_model.*``: every tensor is still read shard by shard."""
    said: list[str] = []
    model, reference = build(saved[arch], say=said.append), pretrained(saved[arch])
    assert type(model) is type(reference)
    assert any("read shard by shard from 1 safetensors file" in line for line in said), said
    inputs = vlm_inputs(arch)
    assert torch.equal(vlm_logits(model, inputs), vlm_logits(reference, inputs))
    without_image = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    assert not torch.equal(vlm_logits(model, inputs), vlm_logits(model, without_image))  # images count


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_load_uses_the_image_text_to_text_class(saved, arch):
    """The old path (``model.meta_init=false``, and ``load_model`` itself) loads a VLM too: no
    "Unrecognized configuration class ... AutoModelForCausalLM" error."""
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={saved[arch]}"])])
    model = load_model(cfg.model, seed=0, dtype=torch.float32)
    inputs = vlm_inputs(arch)
    assert torch.equal(vlm_logits(model, inputs), vlm_logits(pretrained(saved[arch]), inputs))
    model = build(saved[arch], "model.meta_init=false")
    assert torch.equal(vlm_logits(model, inputs), vlm_logits(pretrained(saved[arch]), inputs))


def test_random_start_of_a_vlm_is_seeded_per_parameter(saved):
    first = build(saved["qwen2_vl"], "model.from_scratch=true", "train.seed=3")
    again = build(saved["qwen2_vl"], "model.from_scratch=true", "train.seed=3")
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
        assert torch.isfinite(a).all(), name
    patch = first.model.visual.patch_embed.proj.weight  # the vision tower is initialised too
    assert 0 < patch.std().item() < 1
    assert torch.isfinite(vlm_logits(first, vlm_inputs("qwen2_vl"))).all()


# ------------------------------------------------------------------------------ freezing and LoRA
def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, tower, projector", [
    ("qwen2_vl", "model.visual.blocks.", "model.visual.merger."),
    ("gemma3", "model.vision_tower.", "model.multi_modal_projector."),
])
def test_vision_tower_frozen_by_default_projector_on_request(saved, arch, tower, projector):
    model = build(saved[arch])
    names, default = {name for name, _ in model.named_parameters()}, trainable(model)
    assert not any(n.startswith(tower) for n in default)
    assert any(n.startswith(projector) for n in default)
    assert any(n.startswith("model.language_model.layers.") for n in default) and model.lm_head.weight.requires_grad
    model = build(saved[arch], "model.freeze_projector=true")
    both = trainable(model)
    assert not any(n.startswith((tower, projector)) for n in both) and model.lm_head.weight.requires_grad
    assert trainable(build(saved[arch], "model.freeze_vision=false")) == names


def test_freezing_options_leave_a_text_only_model_alone():
    from test_structure import tiny_llama

    model = tiny_llama()
    assert vlm.apply_freezing(model, freeze_vision=True, freeze_projector=True) == {"vision": 0, "projector": 0}
    assert all(p.requires_grad for p in model.parameters())
    assert vlm.language_lora_targets(model) is None and vlm.vision_parts(model) == ([], [])


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_lora_adapts_only_the_language_model(saved, arch):
    model = build(saved[arch], "peft.method=lora")
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    prefix = "base_model.model.model.language_model.layers."
    assert adapted and all(name.startswith(prefix) for name in adapted), sorted(adapted)
    assert {name.rpartition(".")[2] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"}
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    inputs = vlm_inputs(arch)
    reference = vlm_logits(pretrained(saved[arch]), inputs)
    assert torch.allclose(vlm_logits(model, inputs), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_an_explicit_lora_target_list_is_used_as_given(saved):
    model = build(saved["gemma3"], "peft.method=lora", "peft.target_modules=[q_proj]")
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert any(".vision_tower." in name for name in adapted) and any(".language_model." in name for name in adapted)


# ------------------------------------------------------------------------------ outputs
def gemma3_processor():
    """A real Gemma 3 processor built offline: the demo tokenizer with Gemma 3's image tokens and
    an image processor for 28-pixel images (4 image tokens)."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    from automodel_cli.assets import demo_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_dir(), extra_special_tokens={
        "boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"})
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4)


def train_a_little(model: torch.nn.Module, arch: str) -> None:
    """Two optimizer steps on image inputs, so saved weights differ from the start."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    inputs = vlm_inputs(arch)
    model.train()
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", ARCHS)
def test_final_loads_with_image_text_to_text_and_keeps_the_processor(saved, tmp_path, arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from safetensors import safe_open

    from automodel_cli.components.models.saving import save_final

    model = build(saved[arch])
    train_a_little(model, arch)
    processor = gemma3_processor()  # save_final takes anything with save_pretrained
    final = save_final(model, processor, tmp_path, merge=False, base_path=saved[arch])
    with safe_open(final / "model.safetensors", "pt") as f, safe_open(saved[arch] / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the names save_pretrained writes
    loaded = AutoModelForImageTextToText.from_pretrained(final)
    inputs = vlm_inputs(arch)
    assert torch.equal(vlm_logits(loaded, inputs), vlm_logits(model, inputs))
    assert not torch.equal(vlm_logits(loaded, inputs), vlm_logits(pretrained(saved[arch]), inputs))
    again = AutoProcessor.from_pretrained(final)
    assert type(again).__name__ == "Gemma3Processor" and again.image_seq_length == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_final_loads_with_peft_on_the_base_vlm_and_merges(saved, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from automodel_cli.components.models.saving import save_final

    model = build(saved[arch], "peft.method=lora")
    train_a_little(model, arch)
    tokenizer = SimpleNamespace(save_pretrained=lambda directory: None)
    final = save_final(model, tokenizer, tmp_path, merge=True, base_path=saved[arch])
    inputs = vlm_inputs(arch)
    expected = vlm_logits(model, inputs)
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(saved[arch]), final)
    tolerance = 1e-5 * expected.abs().max().item()  # the same sums, in another order when merged
    assert torch.allclose(vlm_logits(loaded, inputs), expected, rtol=0, atol=tolerance)
    merged = AutoModelForImageTextToText.from_pretrained(final / "merged")
    assert torch.allclose(vlm_logits(merged, inputs), expected, rtol=0, atol=tolerance)
    assert not torch.allclose(expected, vlm_logits(pretrained(saved[arch]), inputs), rtol=0, atol=tolerance)


@pytest.mark.parametrize("arch", ARCHS)
def test_dcp_checkpoint_and_consolidate_round_trip_a_vlm(saved, tmp_path, arch):
    from transformers import AutoModelForImageTextToText

    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from automodel_cli.components.checkpoint.consolidate import consolidate

    model = build(saved[arch], "model.freeze_vision=false")
    train_a_little(model, arch)
    save_checkpoint(tmp_path / "run", 2, model=model, optimizer=None, scheduler=None, train_state={}, keep=None)
    inputs = vlm_inputs(arch)
    expected = vlm_logits(model, inputs)
    fresh = build(saved[arch], "model.freeze_vision=false")
    load_checkpoint(find_checkpoint("auto", tmp_path / "run"), model=fresh, optimizer=None, scheduler=None)
    assert torch.equal(vlm_logits(fresh, inputs), expected)
    consolidate(tmp_path / "run", tmp_path / "hf")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    assert torch.equal(vlm_logits(loaded, inputs), expected)


def test_a_fresh_vlm_has_a_vision_tower_and_a_projector():
    tower, projector = vlm.vision_parts(make_vlm("qwen2_vl"))
    assert tower and all(n.startswith("model.visual.") and ".merger." not in n for n in tower)
    assert projector and all(n.startswith("model.visual.merger.") for n in projector)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_checkpoint_consolidates_to_an_adapter_and_a_merged_vlm(saved, tmp_path, arch):
    """The adapter's keys name the modules (``model.language_model.layers.*``), the base model's
    files the checkpoint format (``model.layers.*``): merging pairs them by the model's own names."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from automodel_cli.components.checkpoint import save_checkpoint
    from automodel_cli.components.checkpoint.consolidate import consolidate

    model = build(saved[arch], "peft.method=lora")
    train_a_little(model, arch)
    model.peft_config["default"].base_model_name_or_path = str(saved[arch])
    save_checkpoint(tmp_path / "run", 2, model=model, optimizer=None, scheduler=None, train_state={}, keep=None)
    inputs = vlm_inputs(arch)
    expected = vlm_logits(model, inputs)
    tolerance = 1e-5 * expected.abs().max().item()  # the merged sums, in another order
    assert consolidate(tmp_path / "run", tmp_path / "adapter", base_model=saved[arch]).kind == "adapter"
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(saved[arch]), tmp_path / "adapter")
    assert torch.allclose(vlm_logits(loaded, inputs), expected, rtol=0, atol=tolerance)
    result = consolidate(tmp_path / "run", tmp_path / "merged", merge_lora=True, base_model=saved[arch])
    assert result.kind == "merged"
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert torch.allclose(vlm_logits(merged, inputs), expected, rtol=0, atol=tolerance)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is not None,
                    reason="torchvision is installed: the Qwen2-VL processor loads")
def test_a_processor_that_needs_torchvision_says_so(tmp_path):
    """Qwen2-VL's processor includes a video processor, which transformers builds only with
    torchvision: without it the error names torchvision and the extra, not a broken directory."""
    from automodel_cli.components.data.tiny_processor import build_qwen2_vl_processor
    from automodel_cli.components.models.loading import load_tokenizer
    from automodel_cli.errors import UserError

    directory = build_qwen2_vl_processor(tmp_path / "m")
    save_vlm(directory, "qwen2_vl")
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={directory}"])])
    with pytest.raises(UserError) as caught:
        load_tokenizer(cfg.model, processor=True)
    assert "needs torchvision" in str(caught.value) and "automodel-cli[vlm]" in caught.value.hint
