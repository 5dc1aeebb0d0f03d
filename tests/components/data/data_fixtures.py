"""Shared fixtures for the data tests: real tokenizers built locally (no hub) and data-file
writers. Imported explicitly by the test modules (not a conftest.py, which would shadow the
top-level tests/conftest.py that other tests import helpers from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The bundled character-level demo tokenizer (has BOS/EOS/PAD and a chat template with
    {% generation %} markers)."""
    from transformers import AutoTokenizer

    from automodel_cli.assets import demo_dir

    return AutoTokenizer.from_pretrained(demo_dir())


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A whitespace WordLevel tokenizer built with `tokenizers`, saved and reloaded through
    AutoTokenizer: no BOS token, EOS `</s>`, and a chat template WITHOUT generation markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = (
        "<pad> </s> <unk> [user] [assistant] [system] [end] hello hi how are you fine thanks "
        "what is the capital of france paris and germany berlin be brief question answer context "
        "a b c d e f g"
    ).split()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end] ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=template,
    )
    out = tmp_path_factory.mktemp("word_tokenizer")
    hf.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.bos_token_id is None and loaded.eos_token_id == vocab["</s>"]
    return loaded


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    """jsonl(name, rows) -> path of a JSON Lines file in tmp_path."""

    def make(name: str, rows) -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make
