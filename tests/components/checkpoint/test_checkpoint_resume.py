"""Exact resume: a run split by save/load must be bitwise identical to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import VOCAB, TinyLM, llama, make_run, tiny, train

from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from automodel_cli.components.checkpoint.dcp_io import read_metadata, tensor_infos
from automodel_cli.components.checkpoint.save import start_checkpoint
from automodel_cli.errors import UserError


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {i}: {x.item()!r} != {y.item()!r}"


def save(run, run_dir, step, keep=2, **train_state):
    return save_checkpoint(run_dir, step, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, train_state={"epoch": 0, **train_state},
                           keep=keep, generators=run.generators)


@pytest.mark.parametrize("background", [False, True], ids=["blocking", "background"])
def test_full_finetune_resume_is_bitwise_exact(tmp_path, background):
    reference = make_run(llama(seed=0))
    expected = train(reference, 8)

    first = make_run(llama(seed=0))
    assert_bitwise_equal(train(first, 4), expected[:4])
    pending = start_checkpoint(tmp_path, 4, model=first.model, optimizer=first.optimizer, scheduler=first.scheduler,
                               train_state={"epoch": 0, "samples_consumed": 16, "data_seed": 1234}, keep=2,
                               generators=first.generators, background=background)
    if background:  # training goes on (changing every tensor in place) while the shards are written
        assert_bitwise_equal(train(first, 4), expected[4:])
        assert find_checkpoint("auto", tmp_path) is None  # published by finish() only
    path = pending.finish()

    # A fresh process would build everything anew, from different random init and RNG states.
    resumed = make_run(llama(seed=99))
    torch.manual_seed(12345)
    found = find_checkpoint("auto", tmp_path)
    assert found == path
    state = load_checkpoint(found, model=resumed.model, optimizer=resumed.optimizer,
                            scheduler=resumed.scheduler, generators=resumed.generators)
    assert state == {"step": 4, "epoch": 0, "samples_consumed": 16, "data_seed": 1234}
    assert resumed.scheduler.last_epoch == 4
    assert_bitwise_equal(train(resumed, 4), expected[4:])

    # Control: the RNG restore matters (dropout), so the test above can fail.
    control = make_run(llama(seed=99))
    load_checkpoint(path, model=control.model, optimizer=control.optimizer,
                    scheduler=control.scheduler, generators=control.generators)
    torch.manual_seed(7)
    assert not torch.equal(train(control, 1)[0], expected[4])


def stored_tensors(path) -> dict:
    """name -> TensorInfo of the model tensors in a checkpoint (from the DCP index)."""
    return tensor_infos(read_metadata(path / "model"))


def test_checkpoint_files_and_meta(tmp_path):
    run = tiny()
    train(run, 1)
    path = save(run, tmp_path, 1)
    assert path == tmp_path / "checkpoints" / "step_00000001"
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["meta.json", "model/.metadata", "model/__0_0.distcp", "optim/.metadata",
                     "optim/__0_0.distcp", "rng/rank_0.pt", "scheduler.pt", "train_state.json"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["step"] == 1
    assert meta["world_size"] == 1 and meta["mesh"] is None
    assert meta["model_class"].endswith("TinyLM")
    assert meta["params"]["head.weight"] == {"shape": [64, 8], "dtype": "float32"}
    assert len(meta["params_sha256"]) == 64
    assert sorted(meta["files"]) == [f for f in files if f != "meta.json"]
    for name, info in meta["files"].items():
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    # The DCP index describes the trainable parameters; optimizer keys use parameter names.
    assert {n: list(i.shape) for n, i in stored_tensors(path).items()} == {
        "embed.weight": [64, 8], "head.weight": [64, 8], "head.bias": [64]}
    optim = tensor_infos(read_metadata(path / "optim"))
    assert {"state.head.weight.exp_avg", "state.head.weight.exp_avg_sq", "state.head.weight.step"} <= set(optim)
    # Every .pt file loads with weights_only=True (the only way we ever read them).
    for name in ("scheduler.pt", "rng/rank_0.pt"):
        torch.load(path / name, weights_only=True)


def test_hf_files_are_stored_for_consolidation(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    run = make_run(llama(seed=0))
    path = save_checkpoint(tmp_path, 3, model=run.model, optimizer=None, scheduler=None,
                           train_state={}, keep=1, tokenizer=tokenizer,
                           extra_files={"notes/README.md": "hello", "chat_template.jinja": b"{{ x }}"})
    hf = path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 32
    assert (hf / "generation_config.json").is_file() and (hf / "tokenizer.json").is_file()
    assert (hf / "notes" / "README.md").read_text() == "hello"
    assert (hf / "chat_template.jinja").read_bytes() == b"{{ x }}"
    meta = json.loads((path / "meta.json").read_text())
    assert "hf/config.json" in meta["files"] and "optim/.metadata" not in meta["files"]
    assert meta["hf_architecture"] == "LlamaForCausalLM" and meta["peft"] is None
    assert meta["trainable_only"] is False
    with pytest.raises(ValueError, match="relative paths"):
        save_checkpoint(tmp_path, 4, model=run.model, optimizer=None, scheduler=None,
                        train_state={}, keep=1, extra_files={"../escape": "x"})


def test_numpy_and_python_rng_round_trip(tmp_path):
    import random

    import numpy as np

    run = tiny()
    random.seed(3)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    path = save(run, tmp_path, 1)
    expected = (random.random(), np.random.normal(), np.random.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    assert (random.random(), np.random.normal(), np.random.rand(3).tolist()) == expected


def test_lora_round_trip_saves_only_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_run(adapter_seed: int):
        base = llama(seed=0)  # the same base weights, as from_pretrained would give
        torch.manual_seed(adapter_seed)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                target_modules="all-linear"))
        return make_run(model)

    reference = lora_run(adapter_seed=1)
    expected = train(reference, 4)

    first = lora_run(adapter_seed=1)
    train(first, 2)
    path = save(first, tmp_path, 2)
    saved = stored_tensors(path)
    trainable = {n for n, p in first.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    assert all("lora_" in name for name in saved)
    assert len(saved) == 2 * 2 * 7  # 2 layers x 7 linear modules x (A, B); lm_head excluded

    resumed = lora_run(adapter_seed=5)
    load_checkpoint(path, model=resumed.model, optimizer=resumed.optimizer,
                    scheduler=resumed.scheduler, generators=resumed.generators)
    assert_bitwise_equal(train(resumed, 2), expected[2:])

    # An adapter checkpoint does not fit a full fine-tune of the same base model.
    full = make_run(llama(seed=0))
    with pytest.raises(UserError, match=r"lora_A\.default\.weight` is in the checkpoint but is not"):
        load_checkpoint(path, model=full.model, optimizer=full.optimizer, scheduler=full.scheduler)


def test_different_model_is_a_user_error_naming_the_tensor(tmp_path):
    run = make_run(llama(seed=0))
    path = save(run, tmp_path, 1)
    other = make_run(llama(seed=0, intermediate_size=48))
    before = [p.detach().clone() for p in other.model.parameters()]
    with pytest.raises(UserError) as info:
        load_checkpoint(path, model=other.model, optimizer=other.optimizer, scheduler=other.scheduler)
    message = info.value.message
    assert "model.layers.0.mlp.down_proj.weight" in message
    assert "[32, 64] in the checkpoint but [32, 48] in the model" in message
    assert "LlamaForCausalLM" in message
    # Nothing was changed by the failed load.
    assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters()))


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path):
    run = make_run(llama(seed=0, tie_word_embeddings=True))
    model = run.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    train(run, 1)
    path = save(run, tmp_path, 1)
    saved = stored_tensors(path)
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}

    fresh = make_run(llama(seed=3, tie_word_embeddings=True))
    load_checkpoint(path, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    assert torch.equal(fresh.model.lm_head.weight, model.lm_head.weight)
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight


def test_parameters_sharing_one_storage_are_saved(tmp_path):
    """Parameters that are views into one flat buffer (as some wrappers create) would make
    safetensors refuse the file; they must be copied apart when saving."""

    class Flat(TinyLM):
        def __init__(self):
            super().__init__(hidden=4)
            flat = torch.zeros(2 * VOCAB * 4)
            torch.nn.init.normal_(flat)
            self.embed.weight = torch.nn.Parameter(flat[: VOCAB * 4].view(VOCAB, 4))
            self.head.weight = torch.nn.Parameter(flat[VOCAB * 4:].view(VOCAB, 4))

    torch.manual_seed(0)
    run = make_run(Flat())
    assert run.model.embed.weight.untyped_storage().data_ptr() == \
        run.model.head.weight.untyped_storage().data_ptr()
    path = save(run, tmp_path, 1)
    torch.manual_seed(1)
    fresh = make_run(Flat())
    load_checkpoint(path, model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    for a, b in zip(run.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def test_missing_generator_state_is_a_user_error(tmp_path):
    run = tiny()
    path = save_checkpoint(tmp_path, 1, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, train_state={}, keep=1)
    with pytest.raises(UserError, match="random generator"):
        load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        generators={"data": torch.Generator()})


def test_optimizer_of_a_different_shape_is_a_user_error(tmp_path):
    run = tiny()
    path = save(run, tmp_path, 1)
    other = tiny()
    sgd = torch.optim.AdamW([other.model.head.weight], lr=0.1)
    with pytest.raises(UserError, match=r"optim does not fit this run's optimizer \(the checkpoint has `state\.embed\.weight"):
        load_checkpoint(path, model=other.model, optimizer=sgd, scheduler=None)


def test_train_state_must_be_json(tmp_path):
    run = tiny()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model=run.model, optimizer=run.optimizer,
                        scheduler=run.scheduler, train_state={"bad": object()}, keep=1)
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()
