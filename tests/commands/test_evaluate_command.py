"""`automodel evaluate`: loss and perplexity as finetune's validation computes them, generated
answers (batched, left-padded) equal to one-prompt-at-a-time greedy decoding, adapters on their
base, the lm-eval bridge against lm_eval called directly, and bad inputs refused (exit 2)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import one_line, run_cli, tree_digest
from model_dirs import answering_model, save_model, write_own_answers, write_prompts
from tolerances import first_loss_tolerance

#: A short run of the demo model: 2 steps, float32, on 24 prompt/completion rows of which 6 are held
#: out for validation (data.eval_size, with the run's seed).
TRAIN = ("train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4", "logging.progress=false",
         "model.dtype=float32", "data.name=auto", "data.eval_split=null", "data.eval_size=6")
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1"}
#: The demo model's shape, for float32 rounding tolerances (tests/tolerances.py).
DEMO_SHAPE = {"layers": 2, "hidden": 128, "intermediate": 352, "vocab": 64, "positions": 64}


def train(run: Path, *args: str) -> Path:
    data = write_prompts(run.parent / "prompts.jsonl", count=24)
    result = run_cli("finetune", "demo", "-o", str(run), f"data.path={data}", *TRAIN, *args, env=ENV)
    assert result.exit_code == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("evaluate") / "full")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("evaluate") / "lora", "--peft", "lora", "peft.merge=true")


def trained_tokens(run: Path) -> int:
    """Label tokens of the run's validation samples (its summary does not keep them): an upper
    bound from the data, for the tolerance of a loss summed over them."""
    return sum(len(json.loads(line)["completion"]) + 1 for line in (run.parent / "prompts.jsonl").read_text().splitlines())


def evaluate_json(cli, *args: str) -> dict:
    result = cli("evaluate", *args, "--json")
    assert result.exit_code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # stdout holds the JSON object and nothing else


def final_eval_loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["after"]["eval_loss"]


@pytest.mark.slow  # trains a run first
def test_run_directory_loss_is_the_runs_final_validation_loss(cli, full_run):
    report = evaluate_json(cli, str(full_run), "evaluate.max_new_tokens=4")
    metrics, expected = report["metrics"], final_eval_loss(full_run)
    assert metrics["samples"] == 6  # the run's held-out part (data.eval_size=6 split with the run's seed)
    # the same samples and weights, batched in another way: float32 rounding of the loss
    assert metrics["loss"] == pytest.approx(expected, **first_loss_tolerance(
        expected, tokens=trained_tokens(full_run), **DEMO_SHAPE))
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
    assert report["settings"]["kind"] == "model" and report["settings"]["run"] == str(full_run)
    assert metrics["generate_samples"] == 6 and len(report["examples"]) == 3
    # other settings keep the run's data; naming data replaces it
    longer = evaluate_json(cli, str(full_run), "data.max_length=128", "evaluate.generate=false")
    assert longer["metrics"]["samples"] == 6 and longer["settings"]["max_length"] == 128
    other = evaluate_json(cli, str(full_run), f"data.path={full_run.parent / 'prompts.jsonl'}",
                          "evaluate.generate=false")
    assert other["metrics"]["samples"] == 24


def test_generated_answers_equal_unbatched_greedy_decoding(cli, tmp_path):
    model_dir = answering_model(tmp_path / "model")
    answers = write_own_answers(tmp_path / "prompts.jsonl", model_dir, count=10, max_new_tokens=6)
    data = tmp_path / "prompts.jsonl"
    assert len(set(answers)) > 1
    report = evaluate_json(cli, str(model_dir), f"data.path={data}", "evaluate.batch_size=4",
                           "evaluate.max_new_tokens=6", "evaluate.examples=10")
    assert [e["answer"] for e in report["examples"]] == answers  # left padding changed nothing
    metrics = report["metrics"]
    expected = [a == (a if i % 2 == 0 else "zzzz") for i, a in enumerate(answers)]
    assert metrics["generate_exact_match"] == sum(expected) / len(expected) == 0.5
    assert metrics["generate_contains"] == 0.5 and metrics["generate_samples"] == 10
    assert report["examples"][1]["reference"] == "zzzz"


def test_plain_text_data_counts_every_token(cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_model(tmp_path / "model")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc def", "ghij")))
    report = evaluate_json(cli, str(model_dir), f"data.path={data}")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, tokens = 0.0, 0
    for text in ("abc def", "ghij"):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                             tokenizer.eos_token_id]])
        with torch.no_grad():
            total += model(ids, labels=ids).loss.item() * (ids.size(1) - 1)
        tokens += ids.size(1) - 1
    expected = total / tokens
    assert report["metrics"]["loss"] == pytest.approx(expected, **first_loss_tolerance(
        expected, tokens=tokens, **DEMO_SHAPE))
    assert "generate_exact_match" not in report["metrics"] and report["notes"]


@pytest.mark.slow
def test_adapter_evaluates_on_its_base_like_the_merged_model(cli, lora_run):
    data = ("data.path=" + str(lora_run.parent / "prompts.jsonl"), "evaluate.generate=false")
    adapter = evaluate_json(cli, str(lora_run / "final"), *data)
    merged = evaluate_json(cli, str(lora_run / "final" / "merged"), *data)
    assert adapter["settings"]["kind"] == "adapter" and merged["settings"]["kind"] == "model"
    assert adapter["settings"]["model"] == str((lora_run / "base_model").resolve())  # the recorded base
    loss, tokens = adapter["metrics"]["loss"], trained_tokens(lora_run)
    assert adapter["metrics"]["samples"] == 24  # all of data.path: no validation split named
    # the adapter folded into the weights: float32 rounding of a rank-8 merge (tests/tolerances.py)
    assert merged["metrics"]["loss"] == pytest.approx(loss, **first_loss_tolerance(
        loss, tokens=tokens, **{**DEMO_SHAPE, "intermediate": 352 + 16 + 352}))
    plain = evaluate_json(cli, str(lora_run / "base_model"), *data)
    assert plain["metrics"]["loss"] != loss  # the adapter is applied
    run = evaluate_json(cli, str(lora_run), "evaluate.generate=false")  # the run: its adapter on its split
    assert run["settings"]["kind"] == "adapter" and run["metrics"]["samples"] == 6
    expected = final_eval_loss(lora_run)
    assert run["metrics"]["loss"] == pytest.approx(expected, **first_loss_tolerance(
        expected, tokens=tokens, **DEMO_SHAPE))


TASK_YAML = """task: tiny_reverse
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def local_task(directory: Path) -> Path:
    """An lm-eval multiple-choice task on a local jsonl file (no network)."""
    directory.mkdir()
    words = ["abc", "bca", "cab", "dab", "hgf", "ijk", "ffe", "gad"]
    rows = [{"question": f"reverse: {w}\n", "choices": [w[::-1], w, "ee"], "answer": i % 3} for i, w in enumerate(words)]
    (directory / "rev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "tiny_reverse.yaml").write_text(TASK_YAML.format(data=directory / "rev.jsonl"))
    return directory


@pytest.mark.slow  # lm-eval indexes its whole task catalogue (about 10 s)
def test_lm_eval_task_matches_lm_eval_called_directly(cli, full_run, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = local_task(tmp_path / "tasks")
    report = evaluate_json(cli, str(full_run), "--tasks", "tiny_reverse", "--include-path", str(tasks),
                           "evaluate.generate=false", "evaluate.max_samples=4")
    model = AutoModelForCausalLM.from_pretrained(full_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(full_run / "final")
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
                                     tasks=["tiny_reverse"], task_manager=TaskManager(include_path=str(tasks)),
                                     limit=4)["results"]["tiny_reverse"]
    assert report["tasks"]["tiny_reverse"]["acc,none"] == direct["acc,none"]
    assert report["metrics"]["samples"] == 4  # evaluate.max_samples: the run's data too
    unknown = cli("evaluate", str(full_run), "--tasks", "tiny_revers", "--include-path", str(tasks))
    assert unknown.exit_code == 2 and "Did you mean `tiny_reverse`?" in one_line(unknown.stderr)


def test_text_output_has_a_table_and_examples(cli, tmp_path):
    model_dir = save_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse: ab{i}\n", "completion": "ba"}) + "\n" for i in range(3)))
    result = cli("evaluate", str(model_dir), f"data.path={data}", "evaluate.max_new_tokens=3", "evaluate.examples=2")
    assert result.exit_code == 0, result.stderr
    assert "perplexity" in result.stdout and "exact match (generated)" in result.stdout
    assert result.stdout.count("example ") == 2


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_exit_2_with_one_paragraph(cli, tmp_path):
    model_dir = save_model(tmp_path / "model")
    nothing = tmp_path / "empty"
    nothing.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("recipe: finetune\n")
    (unfinished / "metrics.jsonl").write_text("")
    before = tree_digest(unfinished)
    columns = tmp_path / "columns.jsonl"
    columns.write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    classifier = tmp_path / "classifier"  # what `automodel classify` saves: a score head, no LM head
    transformers.LlamaForSequenceClassification(transformers.AutoConfig.from_pretrained(
        model_dir, num_labels=3, pad_token_id=0)).save_pretrained(classifier)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(classifier)
    cases = {
        (str(tmp_path / "missing"),): "does not exist",
        (str(nothing),): "is neither a run directory, a model directory nor a peft adapter directory",
        (str(unfinished),): "has no final/ model",
        (str(model_dir),): "Nothing to evaluate",
        (str(model_dir), f"data.path={columns}"): "lacks the `prompt` and `completion` columns",
        (str(model_dir), "evaluate.batch_size=0"): "`evaluate.batch_size` must be >= 1",
        (str(model_dir), "evaluate.max_new_token=3"): "Did you mean `evaluate.max_new_tokens`?",
        (str(model_dir), "--base", str(model_dir)): "--base is for an adapter directory",
        (str(classifier), f"data.path={columns}"): "is a classifier of 3 labels, and the data does not fit it",
        (str(classifier), f"data.path={columns}", "--tasks", "arc_easy"): "is a sequence classifier",
    }
    for args, expected in cases.items():
        result = cli("evaluate", *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and expected in one_line(result.stderr), (args, result.stderr)
    assert tree_digest(unfinished) == before


def test_tasks_without_lm_eval_name_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if lm-eval were not installed
    result = cli("evaluate", str(save_model(tmp_path / "model")), "--tasks", "hellaswag")
    assert result.exit_code == 2
    assert "pip install 'automodel-cli[lmeval]'" in one_line(result.stderr)


def test_prompt_completion_rows_as_chat_equal_the_same_messages(cli, tmp_path):
    model_dir = save_model(tmp_path / "model")
    pairs = [("reverse: abc", "cba"), ("reverse: hgfe", "efgh")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                      {"role": "assistant", "content": c}]}) + "\n" for p, c in pairs))
    as_chat = evaluate_json(cli, str(model_dir), f"data.path={rows}", "evaluate.chat=true", "evaluate.max_new_tokens=3")
    messages = evaluate_json(cli, str(model_dir), f"data.path={chats}", "evaluate.max_new_tokens=3")
    plain = evaluate_json(cli, str(model_dir), f"data.path={rows}", "evaluate.max_new_tokens=3")
    assert as_chat["metrics"] == messages["metrics"] and as_chat["examples"] == messages["examples"]
    assert plain["metrics"]["loss"] != as_chat["metrics"]["loss"]  # without the template: other tokens
