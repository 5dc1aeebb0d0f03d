"""Sharded checkpoints from real multi-process FSDP2 jobs (torchrun, gloo, CPU).

One 2-rank job trains a tiny Llama, saves at step 2 and continues; resumes on 1, 2 and 4 ranks
must restore the same model and optimizer state bit for bit and continue with the same losses
(to a relative 1e-5: another world size reduces in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolerances import assert_close_f32, decoder_rounding

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(nproc: int, *args: str, cpu_only: bool = True) -> list[dict]:
    """Run the worker on ``nproc`` processes; CPU + gloo unless ``cpu_only=False``."""
    out = Path(args[1]).parent / f"{args[0]}-{nproc}-{os.getpid()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", str(WORKER), *args, str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    return run_dir, torchrun(2, "train", str(run_dir))


def test_sharded_checkpoint_layout(trained):
    run_dir, ranks = trained
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert files == ["hf/config.json", "hf/generation_config.json", "meta.json",
                     "model/.metadata", "model/__0_0.distcp", "model/__1_0.distcp",
                     "optim/.metadata", "optim/__0_0.distcp", "optim/__1_0.distcp",
                     "rng/rank_0.pt", "rng/rank_1.pt", "scheduler.pt", "train_state.json"]
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert meta["mesh"]["shape"] == [2] and meta["mesh"]["dim_names"] == ["dp_shard"]
    assert meta["hf_architecture"] == "LlamaForCausalLM" and "FSDP" in meta["model_class"]
    assert meta["params"]["model.embed_tokens.weight"]["shape"] == [128, 64]  # global, not a shard
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # Each rank wrote (a shard of) the data: both shard files hold tensor bytes.
    assert min((checkpoint / "model" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)) > 100_000
    assert [r["losses"] == ranks[0]["losses"] for r in ranks] == [True, True]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_failure_on_one_rank_is_raised_on_every_rank_and_publishes_nothing(trained):
    """Rank 1 failed writing its RNG file during a save at step 1: no rank hung, every rank
    raised, nothing was published, the scratch directory is gone and training went on."""
    run_dir, ranks = trained
    assert ranks[1]["failed_save"] == "OSError: disk full (simulated on rank 1)"
    assert ranks[0]["failed_save"] == "RankFailed: rank 1 failed: OSError: disk full (simulated on rank 1)"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_on_any_world_size(trained, world):
    run_dir, original = trained
    resumed = torchrun(world, "resume", str(run_dir))
    assert len(resumed) == world
    for rank, result in enumerate(resumed):
        assert result["state_keys_equal"] and result["state_mismatches"] == [], result["state_mismatches"]
        assert result["train_state"] == {"epoch": 0, "step": 2}
        assert result["scheduler_epoch"] == 2
        # The next steps' losses: same model, optimizer moments and schedule -> same numbers, up
        # to rounding: another world size sums the loss and the gradients in another order, and
        # the second step carries the first one's differences (relative, as for any trajectory).
        assert result["next"] == pytest.approx(original[0]["next"], rel=1e-5)
        # The data-order generator continues exactly on every rank.
        assert result["after_load"]["data"] == original[0]["after_save"]["data"]
        # Global RNGs: exact for ranks that existed at save time, fresh for new ones.
        if rank < len(original):
            assert result["after_load"]["torch"] == original[rank]["after_save"]["torch"]
        else:
            assert result["after_load"]["torch"] not in [r["after_save"]["torch"] for r in original]


def test_consolidate_sharded_checkpoint_matches_trained_model(trained, tmp_path):
    """consolidate (no process group) gathers the 2-rank shards into a from_pretrained model."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from automodel_cli.components.checkpoint.consolidate import consolidate

    run_dir, _ = trained
    result = consolidate(run_dir, tmp_path / "hf")
    assert result.kind == "model" and result.files == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = torch.load(run_dir / "reference.pt", weights_only=True)
    trained_model = LlamaForCausalLM(model.config).eval()
    trained_model.load_state_dict({k.removeprefix("model."): v for k, v in reference.items() if k.startswith("model.")})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained_model(ids).logits, rtol=0, atol=0)


def lora_model(base_dir: Path, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def test_fsdp_lora_checkpoint_loads_in_one_process_and_consolidates(trained, tmp_path):
    """LoRA on FSDP2 over 2 ranks saves only the adapter; it loads with no process group into a
    plain peft model, and consolidates to an adapter dir and to a merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint
    from automodel_cli.components.checkpoint.consolidate import consolidate

    run_dir = trained[0] / "lora_run"
    reference = torch.load(run_dir / "reference_logits.pt", weights_only=True)
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["peft"]["adapter_name"] == "default" and meta["trainable_only"] is True
    assert all("lora_" in name for name in meta["params"]) and len(meta["params"]) == 2 * 3 * 2

    # Logits of the same weights in one process and on 2 FSDP ranks: equal to float32 rounding
    # (tests/tolerances.py), also with the rank-4 adapter merged into the weights.
    forward = decoder_rounding(layers=2, hidden=64, intermediate=128, positions=16)
    merged = decoder_rounding(layers=2, hidden=64, intermediate=128, positions=16, merged_rank=4)

    def check(model, rounding):
        with torch.no_grad():
            assert_close_f32(model.eval()(input_ids=reference["ids"]).logits, reference["logits"], **rounding)

    model = lora_model(run_dir / "base_model", seed=9)
    with pytest.raises(AssertionError):
        check(model, forward)  # a different adapter init: the load below is what makes it pass
    load_checkpoint(find_checkpoint("auto", run_dir), model=model, optimizer=None, scheduler=None)
    check(model, forward)

    assert consolidate(run_dir, tmp_path / "adapter").kind == "adapter"
    check(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                    tmp_path / "adapter"), forward)
    result = consolidate(run_dir, tmp_path / "merged", merge_lora=True)
    assert result.kind == "merged" and "base_model" in result.base_source
    check(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), merged)


@pytest.mark.slow
def test_disk_errors_and_damaged_checkpoints_are_decided_alike_on_every_rank(tmp_path):
    """A full disk on rank 1 is the same UserError on both ranks; damage only rank 1 can see
    makes both fall back to the older checkpoint; with none intact both raise the same error."""
    ranks = torchrun(2, "recover", str(tmp_path / "run"))
    for rank in ranks:
        assert rank["disk"].startswith("UserError: Could not save checkpoint step_00000003"), rank["disk"]
        assert "the previous checkpoint, step_00000002, is intact" in rank["disk"]
        assert rank["entries"] == ["latest", "step_00000001", "step_00000002"]
        assert rank["chosen"] == "step_00000001" and rank["loaded_step"] == 1
        assert rank["none_intact"].startswith("checkpoint.resume=auto found no intact checkpoint")
    assert "__1_0.distcp" in ranks[0]["none_intact"] and ranks[0]["none_intact"] == ranks[1]["none_intact"]
    assert len(ranks[0]["notes"]) == 1 and "step_00000002 is damaged" in ranks[0]["notes"][0]
    assert "sha256" in ranks[0]["notes"][0] and "resuming from step_00000001" in ranks[0]["notes"][0]


@pytest.mark.slow
def test_background_saves_on_two_ranks(tmp_path):
    """A background save holds the state of the step it was started at although both ranks
    trained on (with collectives of their own) while it was written; a background write that
    only rank 1's disk refuses is the same UserError on both ranks, and nothing is published."""
    ranks = torchrun(2, "background", str(tmp_path / "run"))
    for rank in ranks:
        assert rank["published"] == "step_00000002" and len(rank["next"]) >= 1
        assert rank["state_mismatches"] == []
        assert rank["refused"].startswith("UserError: Could not save checkpoint step_00000012"), rank["refused"]
        assert "the previous checkpoint, step_00000002, is intact" in rank["refused"]
        assert rank["entries"] == ["latest", "step_00000002"]
    assert ranks[0]["next"] == ranks[1]["next"]
