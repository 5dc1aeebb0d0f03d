"""`automodel data pretokenize`: tokenise once (in parallel), then pretrain from the cache with
exactly the blocks pretrain makes from the text itself."""

from __future__ import annotations

import json

import numpy as np

from automodel_cli.assets import demo_dir

RUN = ["data.name=text", "data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=8",
       "train.max_steps=3", "data.eval_split=null", "train.eval_every_steps=null", "logging.progress=false"]


def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"doc {i}: the owl named max saw {i % 9} frogs by the lake. " * (1 + i % 3)} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_pretokenize_in_parallel_then_pretrain_from_the_cache_gives_the_same_blocks(cli, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from automodel_cli.components.data.text import TokenBlocks, load_pretokenized, tokenize_corpus

    data, cache = corpus(tmp_path), tmp_path / "cache"
    result = cli("data", "pretokenize", str(data), "--tokenizer", "demo", "--out", str(cache), "--num-proc", "2")
    assert result.exit_code == 0, result.stderr
    assert "wrote 60 documents" in result.stdout and "Tokenising text" in result.stderr  # progress bar
    meta = json.loads((cache / "pretokenized.json").read_text())
    assert meta["documents"] == 60 and meta["source"]["path"] == str(data)

    tokenizer = AutoTokenizer.from_pretrained(demo_dir())
    cached, _ = load_pretokenized(str(cache), tokenizer)
    direct = tokenize_corpus(Dataset.from_json(str(data)), tokenizer, "text")
    assert meta["tokens"] == direct.n_tokens and np.array_equal(cached.starts, direct.starts)
    from_cache, from_text = TokenBlocks(cached, 32), TokenBlocks(direct, 32)
    assert len(from_cache) == len(from_text) > 30
    for i in range(len(from_text)):
        for key in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(from_cache[i][key], from_text[i][key])

    losses = {}
    for name, path in (("text", data), ("cache", cache)):
        run = tmp_path / f"run-{name}"
        result = cli("pretrain", "demo", f"data.path={path}", "-o", str(run), *RUN)
        assert result.exit_code == 0, result.stderr
        losses[name] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "pre-tokenised" in result.stdout
    assert losses["cache"] == losses["text"]


def test_pretokenize_refuses_bad_input_and_writes_nothing(cli, tmp_path):
    data = corpus(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = cli("data", "pretokenize", str(data), "-t", "demo", "-o", str(taken))
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    out = tmp_path / "out"
    result = cli("data", "pretokenize", str(data), "-t", "demo", "-o", str(out), "--text-column", "txt")
    assert result.exit_code == 2 and "no `txt` column" in result.stderr and "text" in result.stderr
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    result = cli("data", "pretokenize", str(blank), "-t", "demo", "-o", str(out))
    assert result.exit_code == 2 and "empty" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_cache_from_another_tokenizer_is_refused(cli, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(demo_dir())
    tokenizer.add_tokens(["zz"])
    tokenizer.save_pretrained(other)
    cache = tmp_path / "cache"
    assert cli("data", "pretokenize", str(corpus(tmp_path)), "-t", str(other), "-o", str(cache)).exit_code == 0
    result = cli("pretrain", "demo", f"data.path={cache}", "-o", str(tmp_path / "run"), *RUN)
    assert result.exit_code == 2
    assert "made with tokenizer" in result.stderr and "--tokenizer" in result.stderr
    assert not (tmp_path / "run").exists()
