"""A hub id that cannot be fetched fails at once with what to do (no minute of retries); a hub
id already in the local cache still loads without network.

The endpoint is made unreachable on purpose (``HF_ENDPOINT=http://127.0.0.1:9``: nothing
listens on the discard port, so the connection is refused at once), which keeps the tests
deterministic on machines with and without network. ``HF_HOME`` points at a fresh directory,
so the real cache is never read or written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import run_cli
from model_dirs import save_model, write_prompts

from automodel_cli.components.models import hub

UNREACHABLE = "http://127.0.0.1:9"
QUICK = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4", "data.eval_split=null",
         "logging.progress=false"]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_prompts(tmp_path / "train.jsonl")


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": UNREACHABLE, **extra}


def cache_model(hf_home: Path, repo_id: str) -> None:
    """Put a model into a Hugging Face cache the way ``hf download`` lays it out."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    save_model(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)


def test_probe_of_an_unreachable_endpoint_is_quick():
    started = time.monotonic()
    reason = hub.unreachable_reason(UNREACHABLE)
    assert reason is not None and "127.0.0.1:9" in reason
    assert time.monotonic() - started < hub.PROBE_TIMEOUT_S + 1


def test_probe_goes_to_the_proxy_that_applies(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    assert hub._probe_address("https://huggingface.co") == ("proxy.example", 3128)
    assert hub._probe_address("https://internal.example") == ("internal.example", 443)
    monkeypatch.delenv("https_proxy")
    assert hub._probe_address("http://127.0.0.1:9") == ("127.0.0.1", 9)


@pytest.mark.parametrize("recipe, key", [("finetune", "model.path"), ("distill", "distill.teacher_path")])
def test_hub_id_without_network_fails_at_once(tmp_path, data, recipe, key):
    repo_id = "someorg/not-cached-model"
    target = ["finetune", f"model.path={repo_id}"] if recipe == "finetune" else \
        ["distill", "demo", f"distill.teacher_path={repo_id}"]
    started = time.monotonic()
    result = run_cli(*target, f"data.path={data}", "-o", str(tmp_path / "out"), *QUICK, env=offline_env(tmp_path))
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    for fragment in (f"Cannot download `{repo_id}` ({key})", f"the Hugging Face hub at {UNREACHABLE} cannot be reached",
                     "not in the local cache", f"hf download {repo_id} --local-dir DIR", f"set {key}=DIR",
                     "HF_HUB_OFFLINE=1"):
        assert fragment in result.stderr, result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # retries alone took over 50 s; this is imports plus one probe
    assert not (tmp_path / "out").exists()


def test_offline_mode_names_the_cache(tmp_path, data):
    result = run_cli("finetune", "model.path=someorg/not-cached-model", f"data.path={data}", "-o", str(tmp_path / "o"),
                     *QUICK, env=offline_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_cached_hub_model_trains_without_network(tmp_path, data):
    cache_model(tmp_path / "hf-home", "someorg/tiny-cached")
    started = time.monotonic()
    result = run_cli("finetune", "model.path=someorg/tiny-cached", f"data.path={data}", "-o", str(tmp_path / "out"),
                     *QUICK, env=offline_env(tmp_path))
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "Retrying" not in result.stderr and "saved " in result.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert time.monotonic() - started < 120
    shutil.rmtree(tmp_path / "hf-home")
