"""Bad input to `automodel finetune`: a clear message, exit code 2, no traceback, and nothing
that was already on disk is changed."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

TINY = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4",
        "data.eval_split=null", "logging.progress=false"]


def expect_user_error(result, *fragments):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_missing_model_dir(cli, tmp_path):
    expect_user_error(cli("finetune", f"model.path={tmp_path}/nope", f"data.path={tmp_path}/x.jsonl",
                          "-o", str(tmp_path / "o")), "does not exist", "model.path")


def test_hub_id_without_network(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    result = run_cli("finetune", "model.path=someorg/model-that-is-not-cached", f"data.path={data}",
                     "-o", str(tmp_path / "o"), *TINY, env={"HF_HUB_OFFLINE": "1"})
    expect_user_error(result, "someorg/model-that-is-not-cached", "hub")
    assert not (tmp_path / "o").exists()


def test_missing_columns_name_the_available_ones(cli, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 4)
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "-o", str(tmp_path / "o"), *TINY),
                      "question", "answer", "data.prompt_column")


def test_malformed_jsonl_names_file_and_line(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "-o", str(tmp_path / "o"), *TINY), "d.jsonl line 2")


def test_empty_dataset(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "-o", str(tmp_path / "o"), *TINY), "empty")


def test_all_labels_masked(cli, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "reverse: abcdefghij" * 3, "completion": "x"}] * 4)
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "data.max_length=8", "-o", str(tmp_path / "o"), *TINY), "data.max_length")


def test_batch_sizes_that_do_not_divide(cli, tmp_path):
    expect_user_error(cli("finetune", "demo", "train.global_batch_size=6", "train.micro_batch_size=4",
                          "train.max_steps=1", "-o", str(tmp_path / "o")), "multiple of")


def test_output_dir_with_another_run_is_left_untouched(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("finetune", "demo", "-o", str(run), *TINY).exit_code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # a new run in the same directory
    expect_user_error(cli("finetune", "demo", "-o", str(run), *TINY), "already holds a run",
                      "checkpoint.resume=auto")
    # resuming with settings that change what is trained
    expect_user_error(cli("finetune", "demo", "-o", str(run), "checkpoint.resume=auto",
                          "train.seed=7", *TINY), "holds a different run", "train.seed")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("override, fragment", [
    ("loss.name=nope", "unknown loss `nope`"),
    ("data.name=sqaud", "Did you mean `squad`?"),
])
def test_registry_typos(cli, tmp_path, override, fragment):
    expect_user_error(cli("finetune", "demo", override, "-o", str(tmp_path / "o")), fragment)


def _parts_chat(*user_parts):
    return {"messages": [{"role": "user", "content": [*user_parts, {"type": "text", "text": "hi", "image": None}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "yo", "image": None}]}]}


def test_list_content_for_a_string_only_template(cli, tmp_path):
    """The demo model's template concatenates strings; list contents used to end in a Jinja
    TypeError traceback."""
    data = jsonl(tmp_path / "d.jsonl", [_parts_chat()] * 4)
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "-o", str(tmp_path / "o"), *TINY),
                      "row 0", "cannot render message contents that are lists of parts")
    assert not (tmp_path / "o").exists()


def test_images_for_a_text_only_model(cli, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [_parts_chat({"type": "image", "image": "cat.png", "text": None})] * 4)
    expect_user_error(cli("finetune", "demo", "data.name=instruction", f"data.path={data}",
                          "-o", str(tmp_path / "o"), *TINY), "row 0 contains images", "text-only")
    assert not (tmp_path / "o").exists()
