"""The automatic layout of a configured job (``distributed.auto=true``): what it keeps, what it
writes into the config the processes read, and what `automodel plan` and --dry-run print.

The demo model on CPU processes with ``launch.device_memory_gib=8`` (one node's memory, so 8 /
processes GiB each), and the demo preset's global batch of 32 sequences: on 4 processes plain
FSDP wins (every layout is compute-bound on this tiny model; the tie goes to the one that
communicates least), 32 / 4 = 8 sequences per rank in one micro-batch of 8.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from automodel_cli.commands.run import launch_flags
from automodel_cli.components.launch.start import build_spec, make_launcher
from automodel_cli.components.training.layout import HARDWARE, Layout
from automodel_cli.config.assemble import resolve_command
from automodel_cli.plugin_host import get_registries
from automodel_cli.training.auto_layout import (SOURCE, hardware_for, layout_settings, user_set,
                                                virtual_stages_to_try)
from automodel_cli.training.memory_plan import Target
from conftest import one_line, tree_digest

FOUR = ("--nproc-per-node", "4", "launch.device_memory_gib=8", "distributed.auto=true")


def resolved(*overrides: str, processes: int = 4, files: tuple[str, ...] = (), output_dir: str | None = None):
    registries = get_registries()
    entry = registries.recipes.get("finetune")
    cfg = resolve_command(registries, recipe=entry, target="demo", config_files=list(files),
                          overrides=["launch.device_memory_gib=8", "distributed.auto=true", *overrides],
                          flags=launch_flags(None, processes, None, None, None, output_dir))
    return registries, entry, cfg


def table_rows(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layout "))
    return lines[start + 1:lines.index("", start)]


# ----------------------------------------------------------------------- layout -> keys
def test_a_layout_maps_to_the_config_keys():
    interleaved = Layout(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2, ep=1, micro_batch=4, accumulation=2,
                         activation_checkpointing="selective", virtual_stages=2)
    assert layout_settings(interleaved) == {
        "distributed.pp": 2, "distributed.dp_replicate": 1, "distributed.dp_shard": 2, "distributed.cp": 1,
        "distributed.tp": 2, "distributed.ep": 1, "train.micro_batch_size": 4,
        "train.activation_checkpointing": "selective",
        "distributed.pp_schedule": "interleaved_1f1b", "distributed.pp_virtual_stages": 2}
    one_chunk = layout_settings(Layout(pp=4, dp_shard=2, micro_batch=1, accumulation=8))
    assert (one_chunk["distributed.pp_schedule"], one_chunk["distributed.pp_virtual_stages"]) == ("1f1b", 1)
    plain = layout_settings(Layout(dp_replicate=2, cp=8))  # no pipeline: its schedule keys are left alone
    assert plain["distributed.dp_replicate"] == 2 and plain["distributed.cp"] == 8
    assert "distributed.pp_schedule" not in plain and plain["train.activation_checkpointing"] == "none"


def test_a_pipeline_schedule_the_user_set_decides_the_chunks_tried():
    assert virtual_stages_to_try({}) == (1, 2)
    assert virtual_stages_to_try({"distributed.pp_schedule": "interleaved_1f1b"}) == (2,)
    interleaved_4 = {"distributed.pp_schedule": "interleaved_1f1b", "distributed.pp_virtual_stages": 4}
    assert virtual_stages_to_try(interleaved_4) == (4,)
    assert virtual_stages_to_try({"distributed.pp_schedule": "gpipe"}) == (1,)
    assert virtual_stages_to_try({"distributed.pp_virtual_stages": 3}) == (3,)


def test_the_hardware_comes_from_the_gpu_name_or_the_h100():
    _, _, cfg = resolved()
    gpu = lambda name: Target("cuda", 80 * 2**30, "this machine's GPU", gpu=name)  # noqa: E731
    assert hardware_for(cfg, gpu("NVIDIA H200")) == HARDWARE["h200"]
    a100 = hardware_for(cfg, gpu("NVIDIA A100-SXM4-80GB"))  # not in the table: its bf16 peak, the H100's links
    assert (a100.name, a100.peak_flops, a100.intra_node_bandwidth) == ("NVIDIA A100-SXM4-80GB", 312e12,
                                                                        HARDWARE["h100"].intra_node_bandwidth)
    assert hardware_for(cfg, Target("cuda", None, "a cluster job")) == HARDWARE["h100"]
    assert hardware_for(cfg, Target("cpu", 2**30, "host")) == HARDWARE["cpu"]
    _, _, given = resolved("train.peak_tflops=500")
    assert hardware_for(given, gpu("NVIDIA H100 80GB HBM3")).peak_flops == 500e12


# ------------------------------------------------------------------------- constraints
def test_only_keys_set_on_the_command_line_or_in_a_file_are_constraints(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("distributed:\n  cp: 1\n")
    _, _, cfg = resolved("distributed.tp=2", files=(str(file),))
    assert user_set(cfg, "distributed.tp") and user_set(cfg, "distributed.cp")
    assert not user_set(cfg, "train.micro_batch_size")  # the demo preset's 32
    assert not user_set(cfg, "distributed.dp_shard")  # the default -1


def test_an_explicit_tp_is_kept_and_the_rest_chosen(cli):
    free = cli("plan", "demo", *FOUR)
    assert free.exit_code == 0, free.stderr
    assert "Chosen: dp_shard=4, micro-batch 8 x 1 per step" in free.stdout

    result = cli("plan", "demo", *FOUR, "distributed.tp=2")
    assert result.exit_code == 0, result.stderr
    assert "kept as set: distributed.tp=2" in result.stdout
    rows = table_rows(result.stdout)
    assert rows and all("tp=2" in row for row in rows)
    # 4 processes, tp=2: dp_shard=2 takes 32 / 2 = 16 sequences per rank in one micro-batch.
    assert "Chosen: dp_shard=2 x tp=2, micro-batch 16 x 1 per step" in result.stdout
    applied = next(line for line in result.stdout.splitlines() if line.startswith("applied: "))
    assert "distributed.tp" not in applied
    assert "distributed.dp_shard=2 " in applied and "train.micro_batch_size=16 " in applied
    assert "dp_replicate=1 x dp_shard=2 x tp=2 = 4 process(es)" in result.stdout  # the plan of that layout


def test_the_frozen_config_holds_the_chosen_values(tmp_path):
    """What the processes read: concrete sizes, the global batch as configured, and the source
    of every chosen value; they never choose again (they start from these values)."""
    registries, entry, cfg = resolved("distributed.tp=2", output_dir=str(tmp_path / "run"))
    spec = build_spec(entry, cfg, make_launcher(registries, "local"), registries)
    assert (spec.mesh.dp_shard, spec.mesh.tp, spec.mesh.world_size) == (2, 2, 4)
    frozen = yaml.safe_load(spec.frozen_config_text(output_dir=str(tmp_path / "run")))
    assert {key: frozen["distributed"][key] for key in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")} == \
        {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2, "ep": 1}
    assert frozen["train"]["micro_batch_size"] == 16 and frozen["train"]["global_batch_size"] == 32
    assert frozen["train"]["activation_checkpointing"] == "none"
    assert cfg.source_of("distributed.dp_shard") == SOURCE
    assert cfg.source_of("distributed.tp").layer.startswith("command line")
    assert not (tmp_path / "run").exists()  # building the job writes nothing


def test_dry_run_prints_the_choice_and_the_sources(cli, tmp_path):
    result = cli("finetune", "demo", *FOUR, "--dry-run", "-o", str(tmp_path / "run"))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "# mesh: dp_replicate=1 dp_shard=4 tp=1 (world size 4" in out
    assert "# automatic layout (distributed.auto=true): 1 node(s) x 4 process(es) of CPU, 2.00 GiB per process" in out
    assert re.search(r"^# dp_shard=4 +8 x 1 +none .* chosen$", out, re.M)
    assert "dp_shard: 4 # from automatic layout (distributed.auto=true)" in out
    assert "micro_batch_size: 8 # from automatic layout (distributed.auto=true)" in out
    assert "global_batch_size: 32 # from preset demo" in out
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- nothing fits
def test_nothing_fits_is_one_paragraph_and_leaves_the_run_directory_alone(cli, tmp_path):
    """Llama 3.1 8B, full fine-tuning in fp32 on 2 CPU processes with 8 GiB: 4 GiB each, 90%
    of it usable (3.60 GiB), against 16 bytes per parameter over 2 shards (~60 GiB)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    before = tree_digest(run)
    result = cli("finetune", "llama3.1-8b", "--nproc-per-node", "2", "launch.device_memory_gib=8",
                 "distributed.auto=true", "data.path=train.jsonl", "-o", str(run))
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    message = one_line(result.stderr)
    assert "No layout of 1 node(s) x 2 process(es) fits 8.0B parameters at 8 x 2048 tokens" in message
    assert "the smallest peak" in message and "exceeds the 3.60 GiB usable" in message
    assert "--peft lora" in message and "data.max_length" in message and "more processes" in message
    assert tree_digest(run) == before


def test_sizes_that_cannot_multiply_to_the_processes_are_a_user_error(cli):
    result = cli("plan", "demo", *FOUR, "distributed.tp=3")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "No layout of 1 node(s) x 4 process(es) has tp=3" in one_line(result.stderr)


# ----------------------------------------------------------------------- automodel plan
def test_plan_prints_the_candidates_the_choice_and_its_memory_plan(cli):
    result = cli("plan", "demo", *FOUR)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith("automatic layout (distributed.auto=true): 1 node(s) x 4 process(es) of CPU, 2.00 GiB per "
                          "process (launch.device_memory_gib=8 per node, 4 process(es)); 32 sequences x 64 tokens")
    header = next(line for line in out.splitlines() if line.startswith("layout "))
    assert all(column in header for column in ("micro x acc", "checkpoint", "memory/GPU", "step", "bubble", "verdict"))
    rows = table_rows(out)
    assert rows[0].split()[:4] == ["dp_shard=4", "8", "x", "1"] and rows[0].endswith("chosen")
    assert any("would split a node" in row for row in rows) and len(rows) <= 21
    assert "applied: distributed.pp=1 distributed.dp_replicate=1 distributed.dp_shard=4 distributed.cp=1 " \
           "distributed.tp=1 distributed.ep=1 train.micro_batch_size=8 train.activation_checkpointing=none" in out
    assert "memory plan per process (finetune, dp_replicate=1 x dp_shard=4 x tp=1 = 4 process(es)" in out
    assert "micro-batch 8 x 64 tokens" in out


@pytest.mark.parametrize("fixed", ["distributed.cp=2", "distributed.pp=2"])
def test_the_table_and_the_runs_memory_plan_give_one_peak(cli, fixed):
    """The layout's memory of a cp or pp layout is the plan the run prints for it."""
    result = cli("plan", "demo", *FOUR, fixed)
    assert result.exit_code == 0, result.stderr
    chosen = table_rows(result.stdout)[0]
    peak = next(line for line in result.stdout.splitlines() if line.strip().startswith("peak "))
    assert re.search(r"(\S+ GiB)", chosen).group(1) == re.search(r"(\S+ GiB)", peak).group(1)


def test_plan_json_has_the_choice(cli):
    result = cli("plan", "demo", *FOUR, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)["auto_layout"]
    assert data["layout"]["distributed.dp_shard"] == 4 and data["applied"]["train.micro_batch_size"] == 8
    assert data["fitting"] <= data["candidates"] and data["peak_bytes"] > 0


def test_dimensions_the_model_cannot_use_are_named(cli):
    result = cli("plan", "demo-moe", *FOUR)
    assert result.exit_code == 0, result.stderr
    assert "not considered: cp (a mixture of experts' balance loss needs whole sequences)" in result.stdout
    assert "not considered: pp (pipeline parallelism does not run a mixture of experts' balance loss)" in result.stdout
    assert not any(re.match(r"(pp|cp)=", row) or " x cp=" in row for row in table_rows(result.stdout))


def test_benchmark_is_refused(cli):
    result = cli("benchmark", "demo", "distributed.auto=true", "--dry-run")
    assert result.exit_code == 2 and "measures the layout it is given" in one_line(result.stderr)
