"""`automodel classify`: sequence classification and Bradley-Terry reward models on the demo
architecture, with real HF I/O (the outputs reload with AutoModelForSequenceClassification),
peft, and the pooled-token, loss and bad-input rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from automodel_cli.assets import demo_dir
from automodel_cli.training.classify_data import CLASSES, REWARD, ClassifyData
from conftest import tree_digest
from model_dirs import TOKENIZER_FILES, save_model
from tolerances import EPS32

FAST = ["logging.progress=false", "model.dtype=float32"]
#: The letter-group demo data, small: 40 steps of 32 samples reach high accuracy.
SHORT = ["train.max_steps=40", "train.eval_every_steps=null", "train.global_batch_size=32",
         "train.micro_batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=4", *FAST]


def expect_user_error(result, *fragments):
    assert result.exit_code == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_rows() -> list[dict]:
    return [json.loads(line) for line in (demo_dir() / "classify_eval.jsonl").read_text().splitlines()]


def eval_loss_of(model, tokenizer, rows: list[dict], labels: list[str]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``rows``, right-padded batches of 16."""
    data = ClassifyData(CLASSES, labels, [], [{"input_ids": tokenizer(r["text"])["input_ids"],
                                               "label": labels.index(r["label"])} for r in rows],
                        tokenizer.pad_token_id)
    loss = correct = 0.0
    model.eval()
    with torch.no_grad():
        for batch in data.eval_batches(16, None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return loss / len(rows), correct / len(rows)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """`automodel classify demo`, 40 steps: full fine-tuning of a head on the random demo model."""
    from automodel_cli.cli import main

    run = tmp_path_factory.mktemp("classify") / "demo"
    assert main(["classify", "demo", "-o", str(run), "checkpoint.every_steps=40", *SHORT]) == 0
    return run


@pytest.fixture(scope="module")
def causal_base(tmp_path_factory) -> Path:
    """A causal LM checkpoint (the demo architecture, save_pretrained) to put heads on."""
    return save_model(tmp_path_factory.mktemp("base") / "model")


@pytest.mark.slow  # a real training run, ~20 s on a CPU
def test_demo_accuracy_rises_and_final_reloads_with_the_same_loss(demo_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = json.loads((demo_run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["eval_accuracy"] < 0.5 < 0.9 < after["eval_accuracy"], (before, after)
    assert after["eval_f1"] > 0.9 > before["eval_f1"]
    metrics = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "f1"} <= set(metrics[0]) and metrics[-1]["accuracy"] > metrics[0]["accuracy"]

    model = AutoModelForSequenceClassification.from_pretrained(demo_run / "final")
    config = model.config
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert config.num_labels == 3 and config.id2label == {0: "a-c", 1: "d-g", 2: "h-j"}
    assert config.label2id == {"a-c": 0, "d-g": 1, "h-j": 2}
    tokenizer = AutoTokenizer.from_pretrained(demo_run / "final")
    assert config.pad_token_id == tokenizer.pad_token_id == 0
    loss, accuracy = eval_loss_of(model, tokenizer, eval_rows(), summary["labels"])
    # The same forward as the run's validation (float32, 150 samples of a 3-way cross-entropy).
    assert loss == pytest.approx(after["eval_loss"], rel=1e-5)
    assert accuracy == after["eval_accuracy"]


@pytest.mark.slow  # shares the demo run
def test_evaluate_on_the_run_gives_its_last_validation(demo_run, cli):
    """`automodel evaluate RUN` on a classifier: the run's validation split and columns, the
    model's labels; the numbers of the run's last validation (other batches: float32 rounding)."""
    after = json.loads((demo_run / "summary.json").read_text())["after"]
    result = cli("evaluate", str(demo_run), "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["task"] == CLASSES and metrics["labels"] == ["a-c", "d-g", "h-j"]
    assert metrics["samples"] == after["eval_samples"] == 150
    assert metrics["loss"] == pytest.approx(after["eval_loss"], rel=1e-5)
    assert metrics["accuracy"] == after["eval_accuracy"] and metrics["f1"] == pytest.approx(after["eval_f1"])
    text = cli("evaluate", str(demo_run), "evaluate.max_samples=30")
    assert text.exit_code == 0 and "30 samples" in text.stdout and "macro F1" in text.stdout
    renamed = jsonl(demo_run.parent / "renamed.jsonl", [{"sentence": r["text"], "label": r["label"]} for r in eval_rows()])
    other = cli("evaluate", str(demo_run / "final"), f"data.path={renamed}", "classify.text_column=sentence", "--json")
    assert other.exit_code == 0, other.stderr
    assert json.loads(other.stdout)["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    unknown = jsonl(demo_run.parent / "unknown.jsonl", [{"text": "abc", "label": "k-z"}])
    expect_user_error(cli("evaluate", str(demo_run), f"data.path={unknown}"), "`k-z`", "the model's labels")
    expect_user_error(cli("evaluate", str(demo_run), "--tasks", "x"), "sequence classifier")


@pytest.mark.slow  # shares the demo run
def test_the_last_checkpoint_consolidates_into_the_same_classifier(demo_run, tmp_path):
    """The checkpoint holds every trained weight, the score head's too."""
    from transformers import AutoModelForSequenceClassification

    from automodel_cli.components.checkpoint.consolidate import consolidate

    meta = json.loads((demo_run / "checkpoints" / "step_00000040" / "meta.json").read_text())
    assert "score.weight" in meta["params"] and not meta["trainable_only"]
    consolidate(demo_run, tmp_path / "out")
    ids = torch.tensor([[1, 5, 6, 7], [1, 12, 13, 0]])
    logits = [AutoModelForSequenceClassification.from_pretrained(path)(input_ids=ids).logits
              for path in (tmp_path / "out", demo_run / "final")]
    assert torch.equal(*logits)  # the same tensors, bit for bit


@pytest.mark.slow  # a real training run, ~20 s on a CPU
def test_lora_on_a_causal_lm_reloads_merged_and_as_adapter(causal_base, tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "lora"
    result = cli("classify", f"model.path={causal_base}", "data.name=demo-classify", "data.eval_split=validation",
                 "data.max_length=64", "--peft", "lora", "-o", str(run), *SHORT)
    assert result.exit_code == 0, result.stderr
    assert "new head score.weight" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_accuracy"] > 0.8 > summary["before"]["eval_accuracy"] + 0.3
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final" / "merged")
    assert merged.config.id2label == {0: "a-c", 1: "d-g", 2: "h-j"}
    config = AutoConfig.from_pretrained(run / "final" / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(causal_base, config=config)
    on_base = PeftModel.from_pretrained(base, run / "final")
    expected = summary["after"]["eval_loss"]
    for model in (merged, on_base):  # merging folds B @ A into the weights: float32 rounding only
        loss, _ = eval_loss_of(model, tokenizer, eval_rows(), summary["labels"])
        assert loss == pytest.approx(expected, rel=1e-4)
    # `automodel evaluate RUN` scores the merged classifier written next to the adapter
    result = cli("evaluate", str(run), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["model"] == str(run / "final" / "merged")
    assert report["metrics"]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # a real training run, ~20 s on a CPU
def test_reward_model_pairwise_accuracy_rises(causal_base, tmp_path, cli):
    """Chosen answers start with a letter of a-e, rejected ones of f-j (prompt column prepended)."""
    import random

    rng = random.Random(0)

    def answer(letters: str) -> str:
        return rng.choice(letters) + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5)))

    rows = [{"prompt": "pick: ", "chosen": answer("abcde"), "rejected": answer("fghij")} for _ in range(400)]
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    run = tmp_path / "reward"
    result = cli("classify", f"model.path={causal_base}", f"data.path={data}", "data.eval_size=64",
                 "data.max_length=64", "-o", str(run), *SHORT)
    assert result.exit_code == 0, result.stderr
    assert "pairwise accuracy" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == REWARD
    before, after = summary["before"], summary["after"]
    assert after["eval_accuracy"] > 0.9 and after["eval_accuracy"] > before["eval_accuracy"] + 0.3
    assert after["eval_margin"] > before["eval_margin"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin"} <= set(metrics[0])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    result = cli("evaluate", str(run), "--json")  # the run's 64 held-out pairs, scored as its validation
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["task"] == REWARD and metrics["samples"] == 64
    assert metrics["loss"] == pytest.approx(after["eval_loss"], rel=1e-5)
    assert metrics["accuracy"] == after["eval_accuracy"]
    assert metrics["margin"] == pytest.approx(after["eval_margin"], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------- units: loss, pooling
def tiny_classifier(num_labels: int, pad_token_id: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(demo_dir(), num_labels=num_labels, pad_token_id=pad_token_id)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_bradley_terry_loss_equals_the_formula_on_a_batch():
    from automodel_cli.training.classify_steps import batch_terms

    data = ClassifyData(REWARD, ["reward"], [], [], 0)
    pairs = [{"chosen_ids": [1, 5, 6, 7], "rejected_ids": [1, 8, 9]}, {"chosen_ids": [1, 4], "rejected_ids": [1, 9, 9, 9, 3]}]
    batch = data.collate(pairs)
    model = tiny_classifier(1, 0)
    scores = model(**batch).logits.float()
    terms = batch_terms(scores, batch, True, 1)
    chosen, rejected = scores[:2, 0], scores[2:, 0]
    expected = -torch.log(torch.sigmoid(chosen - rejected)).sum()
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=8 * EPS32, abs=8 * EPS32)
    assert terms["correct"].item() == int((chosen > rejected).sum())
    assert terms["margin"].item() == pytest.approx((chosen - rejected).sum().item(), rel=8 * EPS32, abs=8 * EPS32)


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "eos-as-pad"])
def test_pooled_position_is_the_last_real_token_of_right_padded_rows(pad_is_eos):
    """Each row of a right-padded batch gets the logits of its own unpadded forward; with EOS as
    the pad token, a row's real trailing EOS counts as padding in both."""
    pad = 2 if pad_is_eos else 0
    rows = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 2] if pad_is_eos else [1, 13, 14, 15]]
    data = ClassifyData(CLASSES, ["x", "y", "z"], [], [], pad)
    batch = data.collate([{"input_ids": r, "label": 0} for r in rows])
    assert batch["input_ids"][1].tolist() == [1, 11, 12, pad, pad, pad, pad]
    model = tiny_classifier(3, pad)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])
        # the reference: the last real token's hidden state through the head, by hand
        hidden = model.model(input_ids=torch.tensor([rows[1]])).last_hidden_state
        by_hand = model.score(hidden[:, len(rows[1]) - 1])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    torch.testing.assert_close(padded[1:2], by_hand, rtol=1e-5, atol=1e-5 * by_hand.abs().max().item())
    assert not torch.allclose(padded[0], padded[1])


def test_reward_pair_chat_layouts_render_the_same_conversation(causal_base):
    """A prompt string or prompt messages before the answer, and UltraFeedback's layout (a prompt
    string next to whole conversations that already start with it): one user turn each time."""
    from transformers import AutoTokenizer

    from automodel_cli.components.data.chat import resolve_template
    from automodel_cli.training.classify_data import render_pair_side

    tokenizer = AutoTokenizer.from_pretrained(causal_base)
    template = resolve_template(tokenizer, None)
    user, answer = {"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}
    layouts = [("reverse: abc", [answer]), ([user], [answer]), (None, [user, answer]), ("reverse: abc", [user, answer])]
    texts = {render_pair_side(tokenizer, prompt, side, template, 0) for prompt, side in layouts}
    assert len(texts) == 1
    assert next(iter(texts)).count("reverse: abc") == 1


def test_macro_f1_of_counts():
    from automodel_cli.components.training.classification import class_counts, macro_f1

    predicted, target = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0])
    counts = class_counts(predicted, target, 4)  # class 3 never occurs: left out of the mean
    f1 = [2 * 1 / (2 + 1 + 1), 2 * 1 / (2 + 0 + 1), 2 * 1 / (2 + 1 + 0)]
    assert macro_f1(counts) == pytest.approx(sum(f1) / 3)


def test_label_ids_from_names_and_integer_ids():
    from automodel_cli.training.classify_data import label_ids, label_set

    assert label_set([3, 1, 3, 2], None, "label", "d") == ["1", "2", "3"]
    assert label_set(["pos", "neg"], None, "label", "d") == ["neg", "pos"]
    assert label_set(["pos"], ["neg", "pos"], "label", "d") == ["neg", "pos"]
    assert label_ids([1, 3], ["1", "2", "3"], "label", "d", "training") == [0, 2]
    assert label_ids(["pos", 0], ["neg", "pos"], "label", "d", "training") == [1, 0]  # an id into classify.labels


# ---------------------------------------------------------------------------- bad inputs
TINY = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4", *FAST]


def test_unknown_evaluation_label_names_label_row_and_known_set(cli, tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"text": "abc", "label": "pos"}, {"text": "hij", "label": "neg"}] * 2)
    evaluation = jsonl(tmp_path / "eval.jsonl", [{"text": "abc", "label": "pos"}, {"text": "ddd", "label": "meh"}])
    expect_user_error(cli("classify", "demo", "data.name=auto", f"data.path={train}", f"data.eval_path={evaluation}",
                          "-o", str(tmp_path / "o"), *TINY),
                      "`meh` (row 1)", "['neg', 'pos']", "eval.jsonl")
    assert not (tmp_path / "o" / "final").exists()


def test_tokenizer_without_pad_token_is_refused_with_the_fix(cli, tmp_path, causal_base):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(causal_base / name, tokenizer_dir / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((tokenizer_dir / name).read_text())
        settings.pop("pad_token", None)
        (tokenizer_dir / name).write_text(json.dumps(settings))
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer_json["padding"] = None
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    args = [f"model.path={causal_base}", f"model.tokenizer={tokenizer_dir}", "data.name=demo-classify", *TINY]
    expect_user_error(cli("classify", *args, "-o", str(tmp_path / "o")), "has no pad token", "classify.pad_token=eos")
    result = cli("classify", *args, "classify.pad_token=eos", "-o", str(tmp_path / "eos"))
    assert result.exit_code == 0, result.stderr
    assert "the pad token is the EOS token" in result.stdout
    assert "config.pad_token_id 0 becomes the tokenizer's pad token id 2" in result.stdout
    assert json.loads((tmp_path / "eos" / "final" / "config.json").read_text())["pad_token_id"] == 2


def test_missing_columns_name_the_columns(cli, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"sentence": "abc", "label": "x"}] * 4)
    expect_user_error(cli("classify", "demo", "data.name=auto", f"data.path={data}", "-o", str(tmp_path / "o"), *TINY),
                      "neither a text column `text`", "['sentence', 'label']", "classify.text_column")
    pairs = jsonl(tmp_path / "p.jsonl", [{"chosen": "abc", "worse": "x"}] * 4)
    expect_user_error(cli("classify", "demo", "data.name=auto", f"data.path={pairs}", "classify.task=reward",
                          "-o", str(tmp_path / "p"), *TINY), "lacks column(s) ['rejected']", "classify.rejected_column")


def test_identical_pair_is_refused_and_an_existing_run_is_untouched(cli, tmp_path):
    earlier = tmp_path / "earlier"
    assert cli("classify", "demo", "data.eval_split=null", "-o", str(earlier), *TINY).exit_code == 0
    pairs = jsonl(tmp_path / "p.jsonl", [{"chosen": "abc", "rejected": "abd"}, {"chosen": "ab", "rejected": "ab"}] * 2)
    before = tree_digest(earlier)
    expect_user_error(cli("classify", "demo", "data.name=auto", f"data.path={pairs}", "-o", str(earlier), *TINY),
                      str(earlier))  # another run's directory is refused before anything is read
    expect_user_error(cli("classify", "demo", "data.name=auto", f"data.path={pairs}", "-o", str(tmp_path / "o"), *TINY),
                      "row 1", "identical")
    assert tree_digest(earlier) == before


def test_sequence_parallelism_and_packing_are_refused():
    """Checked by the recipe before the training run claims a directory; plain tensor
    parallelism is allowed (tests/recipes/test_classify_runs.py runs it)."""
    from automodel_cli.errors import UserError
    from automodel_cli.training.classify_steps import check_layout

    def cfg(tp: int, packing: bool, sp: bool = False) -> SimpleNamespace:
        return SimpleNamespace(distributed=SimpleNamespace(tp=tp, sequence_parallel=sp),
                               data=SimpleNamespace(packing=packing))

    check_layout(cfg(1, False))
    check_layout(cfg(2, False))
    with pytest.raises(UserError, match="distributed.sequence_parallel=true"):
        check_layout(cfg(2, False, sp=True))
    with pytest.raises(UserError, match="data.packing"):
        check_layout(cfg(1, True))


def test_pipeline_and_context_parallelism_are_refused():
    """The training run refuses them for every recipe that does not declare support."""
    from automodel_cli.errors import UserError
    from automodel_cli.training import context_parallel, pipeline

    cfg = SimpleNamespace(distributed=SimpleNamespace(pp=2, pp_schedule="1f1b", pp_virtual_stages=None, pp_split=None),
                          train=SimpleNamespace(compile=False))
    with pytest.raises(UserError, match="not by `automodel classify`"):
        pipeline.check("classify", cfg)
    with pytest.raises(UserError, match="not by `automodel classify`"):
        context_parallel.check_recipe("classify", 2)


def test_the_score_head_stays_trainable_when_vision_parts_are_frozen():
    """model.freeze_vision (true by default) freezes a VLM's vision side; a text decoder's score
    head beside it is no vision part."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from automodel_cli.components.models.vlm import apply_freezing

    config = AutoConfig.from_pretrained(demo_dir(), num_labels=3, architectures=["LlamaForSequenceClassification"])
    model = AutoModelForSequenceClassification.from_config(config)
    assert apply_freezing(model, freeze_vision=True, freeze_projector=True) == {"vision": 0, "projector": 0}
    assert all(p.requires_grad for p in model.parameters())
