"""A model directory that cannot be loaded is reported for what it is, before the tokenizer,
the data or the model load: exit code 2, the file and the fix, no traceback, nothing written.

Model directories are real ``save_pretrained`` output (``model_dirs.save_model``), then damaged
the way copies and downloads get damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from model_dirs import remote_code_model, save_model, write_prompts

from automodel_cli.assets import demo_dir
from automodel_cli.components.models import model_files
from automodel_cli.errors import UserError

@pytest.fixture
def data(tmp_path) -> Path:
    return write_prompts(tmp_path / "train.jsonl")


def finetune(cli, model_path: Path | str, data: Path, out: Path, *extra: str):
    return cli("finetune", f"model.path={model_path}", f"data.path={data}", "-o", str(out), "train.max_steps=1",
               "train.global_batch_size=4", "train.micro_batch_size=4", "data.eval_split=null",
               "logging.progress=false", *extra)


def expect_user_error(result, *fragments: str, absent: tuple[str, ...] = ("Traceback", "hf download")) -> None:
    assert result.exit_code == 2, (result.stdout[-2000:], result.stderr[-4000:])
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    for fragment in absent:
        assert fragment not in result.stderr, result.stderr


class RunsCode:
    """Unpickling this runs ``os.system``: the attack a refused pickle would carry out."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_truncated_safetensors_is_named_before_anything_loads(cli, tmp_path, data):
    model = save_model(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = tree_digest(model)
    result = finetune(cli, model, data, tmp_path / "out")
    expect_user_error(result, f"Weight file `{weights}` (model.path) is corrupt or truncated",
                      "the header describes", "Download or copy the model again")
    assert "train data:" not in result.stdout  # refused before the data was read
    assert not (tmp_path / "out").exists() and tree_digest(model) == before


def test_unsafe_pickle_is_refused_and_never_run(cli, tmp_path, data):
    marker = tmp_path / "code-ran"
    from transformers import AutoConfig, AutoModelForCausalLM

    state = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir())).state_dict()
    model = save_model(tmp_path / "model", bin_state={**state, "extra": RunsCode(marker)})
    before = tree_digest(model)
    result = finetune(cli, model, data, tmp_path / "out")
    expect_user_error(result, "pytorch_model.bin` (model.path): unsafe pickle refused", "`posix.system`",
                      "weights_only=True", "If you trust the file, convert the model to safetensors once",
                      f"model.path={model}-safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and tree_digest(model) == before


def test_the_conversion_command_in_the_hint_works_for_a_trusted_bin(tmp_path):
    """The command the unsafe-pickle message suggests, run as a user would (by a shell), turns
    a .bin model into a safetensors one with the same weights that passes the checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir())).state_dict()
    model = save_model(tmp_path / "model", bin_state=original)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(model_files.convert_bin_command(str(model)), shell=True, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    converted = tmp_path / "model-safetensors"
    model_files.check_model_dir(converted, str(converted), trust_remote_code=False, weights=True)
    assert model_files.weight_files(converted, str(converted)) == [converted / "model.safetensors"]
    assert (converted / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in original.items())


def test_directory_without_config_json_is_reported_as_such_not_as_a_tokenizer_problem(cli, tmp_path, data):
    model = save_model(tmp_path / "model")
    (model / "config.json").unlink()
    result = finetune(cli, model, data, tmp_path / "out")
    expect_user_error(result, f"`{model}` (model.path) is not a model directory: it has no config.json",
                      "model.safetensors", absent=("Traceback", "hf download", "tokenizer `"))
    assert not (tmp_path / "out").exists()


def make_not_a_model(kind: str, root: Path) -> Path:
    directory = root / kind
    directory.mkdir()
    if kind == "data":
        (directory / "train.jsonl").write_text("{}\n")
    elif kind == "adapter":
        (directory / "adapter_config.json").write_text("{}")
    elif kind == "run":
        save_model(directory / "final")
        (directory / "metrics.jsonl").write_text("")
    elif kind == "run-without-final":
        (directory / "checkpoints").mkdir()
    return directory


@pytest.mark.parametrize("kind, fragments", [
    ("empty", ["is not a model directory: it has no config.json (it is empty)", "save_pretrained"]),
    ("data", ["is not a model directory: it has no config.json (it holds train.jsonl)"]),
    ("adapter", ["holds a LoRA/DoRA adapter", "automodel convert merge-lora"]),
    ("run", ["is a run directory, not a model directory", "model.path={dir}/final"]),
    ("run-without-final", ["run directory without a final model", "automodel checkpoint consolidate {dir}"]),
])
def test_a_directory_that_is_not_a_model_says_what_is_missing(tmp_path, kind, fragments):
    from types import SimpleNamespace

    from automodel_cli.components.models.loading import load_config

    directory = make_not_a_model(kind, tmp_path)
    section = SimpleNamespace(path=str(directory), revision=None, from_scratch=False, config={},
                              trust_remote_code=False)
    with pytest.raises(UserError) as caught:
        load_config(section)
    text = caught.value.render()
    for fragment in fragments:
        assert fragment.format(dir=directory) in text, text
    assert "hf download" not in text and "(model.path)" in text


def test_missing_shard_and_weightless_directory(tmp_path):
    model = save_model(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"index.json lists 2 weight files and 1 are missing \(model-00002"):
        model_files.check_model_dir(model, str(model), trust_remote_code=False, weights=True)
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (model / name).unlink()
    torch.save({}, model / "weights.pt")
    with pytest.raises(UserError, match=r"has a model config but no weights: .*weights\.pt is not read"):
        model_files.check_model_dir(model, str(model), trust_remote_code=False, weights=True)
    model_files.check_model_dir(model, str(model), trust_remote_code=False, weights=False)  # from scratch


def test_truncated_bin_is_corrupt_not_unsafe(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    state = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir())).state_dict()
    model = save_model(tmp_path / "model", bin_state=state)
    weights = model / "pytorch_model.bin"
    model_files.check_model_dir(model, str(model), trust_remote_code=False, weights=True)  # whole: fine
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"pytorch_model\.bin` \(model\.path\) is corrupt or truncated"):
        model_files.check_model_dir(model, str(model), trust_remote_code=False, weights=True)


def test_custom_code_needs_trust_remote_code(cli, tmp_path, data):
    model = remote_code_model(tmp_path / "model")
    result = finetune(cli, model, data, tmp_path / "out")
    expect_user_error(result, "needs Python code that ships with the checkpoint", "model_type `fancy_lm`",
                      "modeling_fancy.FancyForCausalLM", "Set model.trust_remote_code=true",
                      "only do it for a source you trust")
    assert not (tmp_path / "out").exists()


def test_known_architecture_with_auto_map_loads_without_trust(tmp_path):
    """auto_map alone does not need custom code when transformers knows the model_type."""
    from types import SimpleNamespace

    from automodel_cli.components.models.loading import load_config

    model = save_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    section = SimpleNamespace(path=str(model), revision=None, from_scratch=False, config={}, trust_remote_code=False)
    assert load_config(section).model_type == "llama"


@pytest.mark.parametrize("damage, fragments", [
    ("truncated", ["(distill.teacher_path) is corrupt or truncated"]),
    ("remote-code", ["Teacher `{dir}` (distill.teacher_path) needs Python code", "Set model.trust_remote_code=true",
                     "model.trust_remote_code applies to the student and the teacher"]),
    ("no-config", ["`{dir}` (distill.teacher_path) is not a model directory"]),
])
def test_teacher_problems_name_the_distill_keys(cli, tmp_path, data, damage, fragments):
    teacher = tmp_path / "teacher"
    if damage == "remote-code":
        remote_code_model(teacher)
    else:
        save_model(teacher)
    if damage == "truncated":
        weights = teacher / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    if damage == "no-config":
        (teacher / "config.json").unlink()
    result = cli("distill", "demo", f"distill.teacher_path={teacher}", "-o", str(tmp_path / "out"),
                 "train.max_steps=1", "data.eval_split=null", "logging.progress=false")
    expect_user_error(result, *[f.format(dir=teacher) for f in fragments])
    assert "train data:" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_files_says_which_key_to_set(tmp_path):
    from types import SimpleNamespace

    from automodel_cli.components.models.loading import load_tokenizer
    from model_dirs import TOKENIZER_FILES

    model = save_model(tmp_path / "model")
    for name in TOKENIZER_FILES:
        (model / name).unlink()
    section = SimpleNamespace(path=str(model), tokenizer=None, revision=None, from_scratch=False, config={},
                              trust_remote_code=False, chat_template=None)
    with pytest.raises(UserError) as caught:
        load_tokenizer(section)
    assert caught.value.message.startswith(f"`{model}` (model.path) holds no tokenizer")
    assert "Set model.tokenizer to" in caught.value.hint and "hf download" not in caught.value.render()
