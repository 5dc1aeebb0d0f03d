"""W&B logger, run for real in offline mode and checked through the run's own record file."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from automodel_cli.components.logging import WandbLogger
from automodel_cli.components.logging.wandb_logger import init_kwargs
from automodel_cli.errors import UserError

SECRET = "hf_SECRETVALUE123"
RUN_CONFIG = {
    "model": {"path": "tiny", "hf_token": SECRET},
    "optim": {"lr": 0.1},
    "logging": {"wandb": {"project": "p", "api_key": SECRET}},
    "db_password": SECRET,
    "client_secret": SECRET,
}


def read_records(path: Path) -> list:
    """Decode a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    [crc32:4][length:2][type:1] chunks after a 7-byte ``:W&B`` header) into protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(root: Path, timeout: float = 15) -> tuple[Path, list]:
    """The run's record file and records, once wandb's service process (which writes the file
    in the background, even after ``finish`` returns) has written the final ``exit`` record."""
    runs = sorted(root.glob("wandb/offline-run-*"))
    assert len(runs) == 1, list(root.rglob("*"))
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return files[0], records
        time.sleep(0.05)


def history(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config_of(records) -> dict:
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            config[item.key] = json.loads(item.value_json)
    return config


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'automodel-cli[wandb]')")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def test_offline_run_has_history_summary_and_no_secrets(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    logger = WandbLogger({"project": "automodel-test", "name": "tiny"}, RUN_CONFIG, tmp_path / "out")
    losses = [2.0, 1.5, 1.25]
    for step, loss in enumerate(losses, start=1):
        logger.log({"loss": loss, "lr": 0.1 * step}, step=step)
    logger.close()
    logger.close()  # idempotent

    path, records = offline_run(tmp_path / "wandb-dir")
    rows = history(records)
    assert [(r["_step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    summaries = [r for r in records if r.WhichOneof("record_type") == "summary"]
    last_loss = [json.loads(i.value_json) for s in summaries for i in s.summary.update
                 if (i.key or "/".join(i.nested_key)) == "loss"][-1]
    assert last_loss == 1.25

    config = config_of(records)
    assert config["optim"] == {"lr": 0.1}
    assert config["model"] == {"path": "tiny"}
    assert config["logging"] == {"wandb": {"project": "p"}}
    assert "db_password" not in config and "client_secret" not in config
    assert SECRET.encode() not in path.read_bytes()


def test_defaults_to_offline_in_output_dir_without_credentials(tmp_path, wandb_env):
    logger = WandbLogger({"project": "automodel-test"}, {"optim": {"lr": 1.0}}, tmp_path / "out")
    assert logger.run.settings.mode == "offline"
    logger.log({"loss": 0.75}, step=10)
    logger.close()
    _, records = offline_run(tmp_path / "out")
    assert [(r["_step"], r["loss"]) for r in history(records)] == [(10, 0.75)]


ALLOWED = {"project", "entity", "mode", "dir", "name", "tags"}


def test_mode_choice(tmp_path):
    out = tmp_path / "out"
    netrc = tmp_path / "netrc"
    assert init_kwargs({}, out, {"NETRC": str(netrc)}, ALLOWED) == {"mode": "offline", "dir": str(out)}
    # The user's choice wins, from the config or from the environment.
    assert init_kwargs({"mode": "online"}, out, {"NETRC": str(netrc)}, ALLOWED)["mode"] == "online"
    assert "mode" not in init_kwargs({}, out, {"WANDB_MODE": "disabled", "NETRC": str(netrc)}, ALLOWED)
    # Logged in (API key, or `wandb login`'s netrc entry for the W&B host): no forced offline.
    assert "mode" not in init_kwargs({}, out, {"WANDB_API_KEY": "x" * 40}, ALLOWED)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert "mode" not in init_kwargs({}, out, {"NETRC": str(netrc)}, ALLOWED)
    # ... but an entry for another host is not a W&B login.
    env = {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"}
    assert init_kwargs({}, out, env, ALLOWED)["mode"] == "offline"
    # WANDB_DIR is respected; an explicit dir wins over both.
    assert "dir" not in init_kwargs({"mode": "offline"}, out, {"WANDB_DIR": "/x"}, ALLOWED)
    assert init_kwargs({"dir": str(tmp_path / "d")}, out, {}, ALLOWED)["dir"] == str(tmp_path / "d")


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Did you mean `project`"):
        init_kwargs({"projcet": "p"}, tmp_path, {}, ALLOWED)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        init_kwargs({"api_key": "secret"}, tmp_path, {}, ALLOWED)


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError) as info:
        WandbLogger({}, {}, tmp_path)
    assert str(info.value) == "logger wandb needs the wandb package: pip install 'automodel-cli[wandb]'"


def test_histograms_are_logged_with_the_given_bins(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    logger = WandbLogger({}, {}, tmp_path / "out")
    logger.log_histograms({"expert_load/layer1": [2.0, 0.0, 6.0]}, step=3)
    logger.close()
    _, records = offline_run(tmp_path / "out")
    (row,) = [r for r in history(records) if "expert_load/layer1/_type" in r]  # nested keys, "/"-joined
    assert row["_step"] == 3 and row["expert_load/layer1/_type"] == "histogram"
    assert row["expert_load/layer1/values"] == [2, 0, 6]
    assert row["expert_load/layer1/bins"] == [-0.5, 0.5, 1.5, 2.5]


def test_a_logger_without_histograms_is_skipped():
    from automodel_cli.components.logging import FanOutLogger, log_histograms

    seen = []

    class Plain:
        def log(self, metrics, step): ...

        def close(self): ...

    class Drawing(Plain):
        def log_histograms(self, histograms, step):
            seen.append((dict(histograms), step))

    log_histograms(Plain(), {"h": [1.0]}, 1)  # no method: nothing happens, no error
    FanOutLogger([Plain(), Drawing()]).log_histograms({"h": [1.0]}, 2)
    assert seen == [({"h": [1.0]}, 2)]
