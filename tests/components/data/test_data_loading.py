"""load_table: every local format, directories and splits, precise errors, offline hub ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_fixtures import jsonl  # noqa: F401  (fixture)
from automodel_cli.components.data import load_table
from automodel_cli.errors import UserError

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]


def test_jsonl_roundtrip(jsonl):
    ds = load_table(str(jsonl("train.jsonl", ROWS)))
    assert ds.column_names == ["prompt", "completion"]
    assert ds[3] == {"prompt": "q3", "completion": "a3"}
    assert len(ds) == 5


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert load_table(str(path))["prompt"][:] == ["a", "c"]


def test_json_array_and_field_option(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS))
    assert load_table(str(array))["completion"][:] == [r["completion"] for r in ROWS]

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"version": 1, "data": ROWS}))
    with pytest.raises(UserError, match=r"data\.options\.field.*\['data'\]"):
        load_table(str(nested))
    assert len(load_table(str(nested), options={"field": "data"})) == 5


def test_json_lines_saved_as_json(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert len(load_table(str(path))) == 5


def test_parquet_and_csv(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv"):
        ds = load_table(str(tmp_path / name))
        assert ds["prompt"][:] == [r["prompt"] for r in ROWS], name


def test_split_slice_on_local_file(jsonl):
    ds = load_table(str(jsonl("t.jsonl", ROWS)), split="train[:2]")
    assert ds["prompt"][:] == ["q0", "q1"]


def test_directory_picks_split_files(tmp_path, jsonl):
    jsonl("train.jsonl", ROWS)
    jsonl("validation.jsonl", ROWS[:2])
    assert len(load_table(str(tmp_path))) == 5
    assert len(load_table(str(tmp_path), split="validation")) == 2
    assert len(load_table(str(tmp_path), split="eval")) == 2  # alias
    with pytest.raises(UserError, match=r"none for split `test`.*data\.split"):
        load_table(str(tmp_path), split="test")


def test_directory_without_split_names_reads_all_files(tmp_path, jsonl):
    jsonl("part-a.jsonl", ROWS[:2])
    jsonl("part-b.jsonl", ROWS[2:])
    assert sorted(load_table(str(tmp_path))["prompt"][:]) == sorted(r["prompt"] for r in ROWS)


def test_directory_with_mixed_formats_is_an_error(tmp_path, jsonl):
    jsonl("a.jsonl", ROWS)
    (tmp_path / "b.csv").write_text("prompt,completion\nx,y\n")
    with pytest.raises(UserError, match="mixes file formats"):
        load_table(str(tmp_path))


def test_malformed_jsonl_names_file_line_and_column(tmp_path):
    lines = [json.dumps(r) for r in ROWS * 4]  # 20 good lines
    lines[16] = '{"prompt": "x" "completion": "y"}'  # line 17: missing comma
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        load_table(str(path))
    message = str(info.value)
    assert "train.jsonl line 17: not valid JSON" in message
    assert "at column 16" in message  # where the comma is missing
    assert info.value.exit_code == 2


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(UserError, match=r"t\.jsonl line 2: expected a JSON object, got list"):
        load_table(str(path))


def test_malformed_json_document_names_line_and_column(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": }\n]\n')
    with pytest.raises(UserError, match=r"rows\.json line 3 column 33: not valid JSON"):
        load_table(str(path))


def test_unparseable_csv_becomes_user_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\na,b\nc,d,e,f\n")
    with pytest.raises(UserError, match=r"Could not read `.*t\.csv` as csv \(ParserError: .*line 3"):
        load_table(str(path))


def test_missing_local_path(tmp_path):
    with pytest.raises(UserError, match=r"`.*nope\.jsonl` does not exist") as info:
        load_table(str(tmp_path / "nope.jsonl"))
    assert "data.path" in info.value.hint
    with pytest.raises(UserError, match="does not exist"):
        load_table("missing-file.jsonl")  # relative, looks like a file: never tried on the hub


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match=r"unsupported extension `\.txt`"):
        load_table(str(path))


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_files(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(UserError, match="has no rows"):
        load_table(str(path))


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(UserError, match="has no rows"):
        load_table(str(path))


def test_offline_hub_id_is_a_user_error():
    """A made-up hub id with HF_HUB_OFFLINE=1 (set before `datasets` is imported, as a user
    would) fails fast with a message that suggests a local file."""
    code = (
        "from automodel_cli.components.data import load_table\n"
        "from automodel_cli.errors import UserError\n"
        "try:\n"
        "    load_table('made-up-org/no-such-dataset-xyz', split='train')\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("USERERROR Dataset `made-up-org/no-such-dataset-xyz` could not be fetched")
    assert "local file with data.path=" in out
