"""Dataset factories in their real schemas, the built-in plugin, and the bundled demo assets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_fixtures import demo_tokenizer, jsonl  # noqa: F401  (fixtures)
from automodel_cli.components.data import demo, hellaswag, instruction, squad
from automodel_cli.errors import UserError

SQUAD_ROWS = [
    {
        "id": "5733be284776f41900661182",
        "title": "University_of_Notre_Dame",
        "context": "Architecturally, the school has a Catholic character.",
        "question": "What character does the school have?",
        "answers": {"text": ["a Catholic character", "Catholic"], "answer_start": [32, 34]},
    },
    {  # SQuAD v2 style unanswerable row: dropped
        "id": "x2", "title": "T", "context": "Nothing here.", "question": "Who?",
        "answers": {"text": [], "answer_start": []},
    },
    {
        "id": "x3", "title": "Paris", "context": "Paris is the capital of France.",
        "question": "What is the capital of France?",
        "answers": {"text": ["Paris"], "answer_start": [0]},
    },
]

HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes.",
     "ctx_b": "then", "ctx": "Then, the man writes. then",
     "endings": [", the man", " the woman", "the car", "the ice"], "source_id": "a", "split": "train",
     "split_type": "indomain", "label": "3"},
    {"ind": 5, "activity_label": "Baking", "ctx_a": "A cook mixes.", "ctx_b": "she",
     "ctx": "A cook mixes. she", "endings": ["bakes", "runs", "sings", "sleeps"],
     "source_id": "b", "split": "train", "split_type": "indomain", "label": "0"},
    {"ind": 6, "activity_label": "Test", "ctx_a": "x", "ctx_b": "y", "ctx": "unlabelled",
     "endings": ["a", "b", "c", "d"], "source_id": "c", "split": "test", "split_type": "indomain",
     "label": ""},
]


def test_squad_local_file_in_real_schema(jsonl):
    ds = squad(str(jsonl("squad.jsonl", SQUAD_ROWS)), "train", {})
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == 2  # the unanswerable row is dropped
    assert ds[0] == {
        "prompt": "Context: Architecturally, the school has a Catholic character.\n"
                  "Question: What character does the school have?\nAnswer:",
        "completion": " a Catholic character",
    }
    assert ds[1]["completion"] == " Paris"


def test_squad_wrong_schema_lists_columns(jsonl):
    path = jsonl("notsquad.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match=r"lacks column\(s\) \['context', 'question', 'answers'\]; "
                                        r"it has \['prompt', 'completion'\]"):
        squad(str(path), "train", {})


def test_hellaswag_string_and_int_labels(jsonl):
    ds = hellaswag(str(jsonl("hs.jsonl", HELLASWAG_ROWS)), "train", {})
    assert ds[:] == {
        "prompt": ["Then, the man writes. then", "A cook mixes. she"],
        "completion": [" the ice", " bakes"],
    }
    rows = [dict(HELLASWAG_ROWS[1], label=2)]  # int label as in some copies
    assert hellaswag(str(jsonl("hs_int.jsonl", rows)), "train", {})[0]["completion"] == " sings"


def test_hellaswag_bad_label_names_row(jsonl):
    rows = [HELLASWAG_ROWS[0], dict(HELLASWAG_ROWS[1], label="7")]
    with pytest.raises(UserError, match=r"row 1: label '7' does not select one of the 4 endings"):
        hellaswag(str(jsonl("hs.jsonl", rows)), "train", {})


def test_hellaswag_only_unlabelled_rows_is_an_error(jsonl):
    with pytest.raises(UserError, match="no row that has a label"):
        hellaswag(str(jsonl("hs.jsonl", HELLASWAG_ROWS[2:])), "train", {})


def test_instruction_returns_raw_table_and_needs_a_path(jsonl):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "source": "x"}]
    ds = instruction(str(jsonl("chat.jsonl", rows)), "train", {})
    assert ds.column_names == ["messages", "source"]
    assert ds[0]["messages"][1] == {"role": "assistant", "content": "hello"}
    with pytest.raises(UserError, match=r"data\.path is not set"):
        instruction(None, "train", {})


def test_demo_dataset_splits_are_disjoint_and_well_formed():
    train, evaluation = demo(None, "train", {}), demo(None, "validation", {})
    assert (len(train), len(evaluation)) == (4000, 200)
    assert len(demo(None, "eval[:10]", {})) == 10
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    for row in list(train.select(range(50))) + list(evaluation.select(range(50))):
        word = row["prompt"].removeprefix("reverse: ").removesuffix("\n")
        assert row["prompt"] == f"reverse: {word}\n"
        assert 3 <= len(word) <= 7 and set(word) <= set("abcdefghij")
        assert row["completion"] == word[::-1]
    with pytest.raises(UserError, match="no split `dev2`"):
        demo(None, "dev2", {})


def test_demo_assets_are_small_and_regenerate_identically(tmp_path):
    """The generator is deterministic: regenerating gives byte-identical data and configs."""
    from automodel_cli.assets import demo_dir

    root = demo_dir()
    assert sum(f.stat().st_size for f in root.iterdir() if f.is_file()) < 1_000_000
    subprocess.run([sys.executable, str(root / "make_demo_assets.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name
    # config.json records the transformers version that wrote it; everything else must match.
    regenerated, bundled = (json.loads((d / "config.json").read_text()) for d in (tmp_path, root))
    regenerated.pop("transformers_version"), bundled.pop("transformers_version")
    assert regenerated == bundled


def test_demo_tokenizer_and_config_agree(demo_tokenizer):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from automodel_cli.assets import demo_dir

    tok = demo_tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    config = AutoConfig.from_pretrained(demo_dir())
    assert config.model_type == "llama"
    assert config.vocab_size == len(tok) <= 64
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads,
            config.max_position_embeddings, config.tie_word_embeddings) == (128, 352, 2, 4, 2, 128, True)
    assert config.use_cache is False  # packed training needs no KV cache
    # character level, lossless on the demo alphabet, no <unk>
    ids = tok("reverse: abcdefghij\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("reverse: abcdefghij\n") and tok.unk_token_id not in ids
    assert tok.decode(ids) == "reverse: abcdefghij\n"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ih"}], tokenize=False)
    assert rendered == "<s><|user|>\nhi<|end|>\n<|assistant|>\nih<|end|>\n"


def test_builtin_dataset_plugin_registers_lazily():
    """The plugin registers the four SFT names, the image-text loader and pretrain's two text sets with
    'module:function' targets, and importing it (and registering) pulls in neither torch nor
    datasets nor transformers."""
    code = (
        "import sys, json\n"
        "import automodel_cli.plugins.datasets as plugin\n"
        "from automodel_cli.registry import DatasetRegistry\n"
        "r = DatasetRegistry(); plugin.register_datasets(r)\n"
        "heavy = [m for m in ('torch', 'datasets', 'transformers') if m in sys.modules]\n"
        "print(json.dumps({'names': r.names(), 'heavy': heavy,"
        " 'targets': [e.target for e in r]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["names"] == ["demo", "demo-text", "demo-vlm", "hellaswag", "instruction", "squad", "text", "vlm"]
    assert result["heavy"] == []
    text = {"demo-text": "text:demo_text", "text": "text:text_dataset", "vlm": "multimodal:vlm",
            "demo-vlm": "shapes:demo_vlm"}
    assert result["targets"] == [f"automodel_cli.components.data.{text.get(n, f'sources:{n}')}"
                                 for n in result["names"]]


def test_builtin_dataset_entries_resolve_to_the_factories():
    import automodel_cli.plugins.datasets as plugin
    from automodel_cli.registry import DatasetRegistry

    registry = DatasetRegistry()
    plugin.register_datasets(registry)
    assert registry.get("squad").load() is squad
    assert registry.get("demo").load()(None, "train[:3]", {})["completion"][:] == [
        r["completion"] for r in demo(None, "train[:3]", {})]
    assert "data.name=auto" in registry.get("instruction").description
