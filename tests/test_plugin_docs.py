"""docs/plugins.md's examples, run as the page shows them: a wrong example fails here.

The page marks its fenced code blocks with words after the language (the fence's info string):

- ```` ```python file=PATH ```` (or ```` ```toml file=PATH ````): a file of its section's example.
  PATH is relative to the example's project directory. Every example of the page is written to
  a directory of its own and all of them are put on ``sys.path`` (their top-level package names
  must differ, which ``test_every_code_block_is_marked_and_every_example_is_tested`` checks).
- ```` ```bash run ````: the section's commands. Each line starting with ``automodel `` is a
  command (``shlex`` splitting, so quotes and ``# comments`` read as in a shell; other lines,
  such as ``pip install``, are not run). The tests run them through the real CLI, in this
  process with the section's package registered by the ``automodel_plugin`` fixture, or in a
  subprocess with the example installed by pip where the command starts new processes; a
  recipe command gets ``FAST`` appended so that a run takes two tiny steps.
- ```` ```python fragment ```` (any language): an excerpt or a signature, not run. A ``python``
  block that says neither ``file=`` nor ``fragment`` fails the test, so no runnable-looking code
  on the page goes untested.

A section is the text under a ``##`` or ``###`` heading (``####`` stays in its section). Each
section holding an example has a test below (``EXAMPLE_TESTS``) that runs its commands and checks
what they should have done; an example without a test, or a test without an example, fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from automodel_cli.errors import UserError
from automodel_cli.testing import PluginFixture
from automodel_cli.components.logging import read_metrics
from conftest import REPO, one_line, run_cli
from plugin_packages import install_plugins
from tolerances import first_loss_tolerance

DOC = REPO / "docs" / "plugins.md"
#: Appended to every recipe command: two steps, no validation, no progress bar.
FAST = ("train.max_steps=2", "data.eval_split=null", "train.eval_every_steps=null", "logging.progress=false")
#: The demo model (automodel_cli/assets/demo/config.json), for float32 tolerances of its losses.
DEMO_MODEL = {"layers": 2, "hidden": 128, "intermediate": 352, "vocab": 64}

FENCE = re.compile(r"^(\s*)```(\S*)(.*)$")
HEADING = re.compile(r"^(#{2,3}) (.+?)\s*$")


# ------------------------------------------------------------------------- reading the page
@dataclass
class Example:
    section: str
    files: dict[str, str] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    root: Path | None = None

    @property
    def package(self) -> str:
        """The top-level package or module of the example's first Python file."""
        first = next(path for path in self.files if path.endswith(".py"))
        return first.split("/")[0].removesuffix(".py")


@dataclass
class Block:
    section: str
    language: str
    words: list[str]
    text: str


def code_blocks(text: str) -> list[Block]:
    blocks, section, lines = [], "", text.splitlines()
    index = 0
    while index < len(lines):
        if (heading := HEADING.match(lines[index])) and not lines[index].startswith("####"):
            section = heading.group(2)
        fence = FENCE.match(lines[index])
        if fence:
            indent, body = len(fence.group(1)), []
            index += 1
            while not re.match(r"^\s*```\s*$", lines[index]):
                body.append(lines[index][indent:])
                index += 1
            blocks.append(Block(section, fence.group(2), fence.group(3).split(), "\n".join(body) + "\n"))
        index += 1
    return blocks


def commands_of(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True)[1:] for line in joined.splitlines()
            if line.strip().startswith("automodel ")]


def parse_examples(text: str) -> dict[str, Example]:
    examples: dict[str, Example] = {}
    for block in code_blocks(text):
        paths = [word.split("=", 1)[1] for word in block.words if word.startswith("file=")]
        if paths:
            examples.setdefault(block.section, Example(block.section)).files[paths[0]] = block.text
        elif "run" in block.words:
            examples.setdefault(block.section, Example(block.section)).commands += commands_of(block.text)
    return examples


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every example of the page, written to disk and importable."""
    root = tmp_path_factory.mktemp("doc_examples")
    found = parse_examples(DOC.read_text())
    for number, example in enumerate(found.values()):
        example.root = root / f"example{number}"
        for path, text in example.files.items():
            (example.root / path).parent.mkdir(parents=True, exist_ok=True)
            (example.root / path).write_text(text)
        sys.path.insert(0, str(example.root))
    importlib.invalidate_caches()
    yield found
    for example in found.values():
        sys.path.remove(str(example.root))
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]


# --------------------------------------------------------------------------- running commands
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Commands run in a fresh directory (``-o runs/...`` lands there); jobs are indexed there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def register(automodel_plugin, example: Example):
    return automodel_plugin(importlib.import_module(example.package))


def with_fast(args: list[str], registries) -> list[str]:
    return [*args, *FAST] if args[0] in registries.recipes else list(args)


def run_in_process(cli, registries, args: list[str]):
    result = cli(*with_fast(args, registries))
    assert result.exit_code == 0, f"automodel {shlex.join(args)} failed:\n{result.stderr}"
    return result


def run_all(cli, automodel_plugin, example: Example):
    """Every command of the section, in this process; the results by command."""
    registries = register(automodel_plugin, example)
    return [run_in_process(cli, registries, args) for args in example.commands]


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def refused(result, *phrases: str) -> None:
    """Exit code 2, no traceback, and each phrase in the one-paragraph message."""
    message = one_line(result.stderr)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in message, message


# ------------------------------------------------------------------------------- the examples
def quick_start(examples, cli, automodel_plugin, workdir, tmp_path_factory):
    """Installed for real (pip, entry point), the plugin is listed with its distribution; the
    dataset trains."""
    example = examples["Quick start"]
    env = install_plugins(tmp_path_factory.mktemp("site"), example.root)
    registries = register(automodel_plugin, example)
    for args in example.commands:
        if args[0] in registries.recipes:
            result = run_in_process(cli, registries, args)
            assert "train data: 900 samples" in result.stdout
            assert (workdir / "runs" / "spelling" / "final" / "config.json").exists()
            continue
        result = run_cli(*args, env=env)
        assert result.exit_code == 0, result.stderr
        row = next(line for line in result.stdout.splitlines() if ("spelling" if args[0] == "list" else "my_plugin") in line)
        assert "my-plugin" in row and "0.1.0" in row, row
        if args[0] == "plugins":
            assert "loaded" in row


def recipes(examples, cli, automodel_plugin, workdir):
    """The recipe's section is shown with its default, validated and read by that recipe only;
    its metric reaches metrics.jsonl and its summary the run's summary.json."""
    shown, trained = run_all(cli, automodel_plugin, examples["register_recipes"])
    assert "neftune: alpha: 5.0 # from defaults" in one_line(shown.stdout)
    run = workdir / "runs" / "neftune"
    steps = metrics(run)
    assert [row["step"] for row in steps] == [1, 2]
    # alpha / sqrt(length * hidden): below alpha / sqrt(hidden), above alpha / sqrt(max_length * hidden)
    assert all(10 / (64 * 128) ** 0.5 <= row["noise_scale"] <= 10 / 128 ** 0.5 for row in steps), steps
    assert json.loads((run / "summary.json").read_text())["neftune_alpha"] == 10
    assert (run / "final" / "config.json").exists()

    refused(cli("neftune", "demo", "neftune.alpha=0", *FAST), "`neftune.alpha` must be > 0, got 0")
    refused(cli("finetune", "demo", "neftune.alpha=1", *FAST), "`neftune` is read by the `neftune` recipe only")
    packed = workdir / "runs" / "packed"
    refused(cli("neftune", "demo", "data.packing=true", "-o", str(packed), *FAST),
            "data.packing=true joins samples", "Set data.packing=false.")
    assert not packed.exists()


def models(examples, cli, automodel_plugin, workdir):
    """The preset sets model.path and its defaults, and its pretrain defaults for pretrain only."""
    shown, for_pretrain, dry_run = run_all(cli, automodel_plugin, examples["register_models"])
    source = "preset smollm2-135m (plugin smollm_presets)"
    for line in ("path: HuggingFaceTB/SmolLM2-135M-Instruct", "max_length: 1024", "global_batch_size: 16"):
        assert f"{line} # from {source}" in one_line(shown.stdout), line
    assert "max_length: 2048 # from preset smollm2-135m for pretrain (plugin smollm_presets)" in one_line(for_pretrain.stdout)
    assert "path: HuggingFaceTB/SmolLM2-135M-Instruct" in dry_run.stdout and "method: lora" in dry_run.stdout
    assert not (workdir / "runs").exists()  # --dry-run writes nothing


def datasets_(examples, cli, automodel_plugin, workdir):
    """The dataset's options are shown with their defaults, reach the factory and are validated;
    its own UserError stops the run before anything is written."""
    shown, trained = run_all(cli, automodel_plugin, examples["register_datasets"])
    provider = "# from defaults of dataset arithmetic (plugin arithmetic_data)"
    assert f"samples: 2000 {provider}" in one_line(shown.stdout) and f"operator: + {provider}" in one_line(shown.stdout)
    assert "train data: 640 samples" in trained.stdout
    from arithmetic_data.data import arithmetic

    table = arithmetic(None, "train", {"samples": 5, "max_operand": 9, "operator": "*"})
    for prompt, completion in zip(table["prompt"], table["completion"]):
        a, b = prompt.rstrip("=").split("*")
        assert int(completion) == int(a) * int(b)

    refused(cli("finetune", "demo", "data.name=arithmetic", "data.arithmetic.operator=/", *FAST),
            "`data.arithmetic.operator` must be one of +, -, *; got '/'")
    run = workdir / "runs" / "test-split"
    refused(cli("finetune", "demo", "data.name=arithmetic", "data.split=test", "-o", str(run), *FAST),
            "The arithmetic dataset has no split `test`.")
    assert not run.exists()


def losses(examples, cli, automodel_plugin, workdir):
    """gamma reaches the loss: 0 trains exactly as masked_ce (to rounding), 1.5 gives less."""
    (trained,) = run_all(cli, automodel_plugin, examples["register_losses"])
    focal = metrics(workdir / "runs" / "focal")[0]
    results = {}
    for name, args in {"ce": ["loss.name=masked_ce"], "gamma0": ["loss.name=focal", "loss.focal.gamma=0"]}.items():
        assert cli("finetune", "demo", "-o", f"runs/{name}", *args, *FAST).exit_code == 0
        results[name] = metrics(workdir / "runs" / name)[0]
    ce = results["ce"]
    assert results["gamma0"]["loss"] == pytest.approx(ce["loss"], **first_loss_tolerance(ce["loss"], **DEMO_MODEL, positions=64,
                                                                          tokens=ce["label_tokens"]))
    # gamma=1.5 weighs each token's loss by (1 - p)^1.5: an untrained model gives every token
    # p near 1/64, so the loss is a few percent below the cross-entropy (far beyond rounding).
    assert 0.9 * ce["loss"] < focal["loss"] < ce["loss"] * (1 - 1e-3)
    refused(cli("finetune", "demo", "loss.name=focal", "loss.focal.gamma=-1", *FAST),
            "`loss.focal.gamma` must be >= 0, got -1")


def parallel_plans(examples, cli, automodel_plugin, workdir):
    """The plan is listed, names modules that exist in a real OLMo model (plain and under LoRA)
    with the documented styles, and refuses sequence parallelism."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from transformers import AutoModelForCausalLM

    example = examples["register_parallel_plans"]
    register(automodel_plugin, example)
    listed = cli("list", "parallel-plans")
    assert any("olmo" in line and "olmo_tp" in line for line in listed.stdout.splitlines()), listed.stdout
    plan_fn = automodel_plugin.registries.parallel_plans.get("olmo").load()
    model = AutoModelForCausalLM.from_config(tiny_olmo_config())
    for candidate in (model, get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))):
        plan = plan_fn(candidate, None, False)
        assert len(plan) == 7 * 2
        for name, style in plan.items():
            candidate.get_submodule(name)  # raises for a name that is not a module
            assert isinstance(style, RowwiseParallel if name.endswith(("o_proj", "down_proj")) else ColwiseParallel)
    with pytest.raises(UserError, match="distributed.sequence_parallel=false"):
        plan_fn(model, None, True)


def launchers(examples, cli, automodel_plugin, workdir):
    """--dry-run renders the job with the option applied and writes nothing; several nodes are
    refused by the launcher's check."""
    example = examples["register_launchers"]
    registries = register(automodel_plugin, example)
    dry_runs = [args for args in example.commands if "--dry-run" in args]
    assert dry_runs
    for args in dry_runs:
        result = run_in_process(cli, registries, args)
        assert "# ---- background: what would be submitted (nothing was) ----" in result.stdout
        assert "nice -n 15 " in result.stdout and "-m automodel_cli finetune " in result.stdout
        assert "nice: 15 # from command line" in one_line(result.stdout)
    assert not (workdir / "runs").exists()
    refused(cli("finetune", "demo", "--launcher", "background", "--nodes", "2", *FAST),
            "runs on this machine only, not on 2 nodes")


def loggers(examples, cli, automodel_plugin, workdir):
    """The logger gets its options (columns), logs the steps train.log_every_steps selects,
    and a UserError from it stops the run before the directory holds a run."""
    (trained,) = run_all(cli, automodel_plugin, examples["register_loggers"])
    run = workdir / "runs" / "csv"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,tokens"
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert [float(row.split(",")[1]) for row in rows[1:]] == [step["loss"] for step in metrics(run)]

    every = workdir / "runs" / "every"
    assert cli("finetune", "demo", "-o", str(every), "logging.loggers=[csv]", *FAST, "train.max_steps=5",
               "train.log_every_steps=2").exit_code == 0
    assert [row.split(",")[0] for row in (every / "metrics.csv").read_text().splitlines()[1:]] == ["2", "4", "5"]
    assert [step["step"] for step in metrics(every)] == [1, 2, 3, 4, 5]  # metrics.jsonl: every step

    refused(cli("finetune", "demo", "logging.loggers=[csv]", "logging.csv.columns=[]", *FAST),
            "`logging.csv.columns` must be a non-empty list of metric names, got []")
    bad = workdir / "runs" / "bad"
    refused(cli("finetune", "demo", "-o", str(bad), "logging.loggers=[csv]", "logging.csv.file=metrics.txt", *FAST),
            "logging.csv.file='metrics.txt' is not a .csv file name.")
    assert not (bad / "config.yaml").exists()  # not a run: the same directory takes the corrected command
    assert cli("finetune", "demo", "-o", str(bad), "logging.loggers=[csv]", *FAST).exit_code == 0


def moe_blocks(examples, cli, automodel_plugin, workdir):
    """The kind is listed, claims only its modules, and the installed forward (grouped GEMM and
    loop) computes what the module's own per-expert loop computes, gradients included."""
    import torch

    from automodel_cli.components.moe.experts import install_experts, moe_kinds
    from tolerances import f32_tol

    example = examples["register_moe_blocks"]
    (listed,) = run_all(cli, automodel_plugin, example)
    assert any("relu2" in line and "relu2_experts" in line for line in listed.stdout.splitlines()), listed.stdout
    kinds = moe_kinds(automodel_plugin.registries.moe_blocks)
    assert [kind.name for kind in kinds] == ["relu2", "hf-fused"]

    class Relu2Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Parameter(torch.randn(4, 16, 8) / 4)
            self.w_out = torch.nn.Parameter(torch.randn(4, 8, 16) / 3)

        def forward(self, hidden, index, weights):  # the reference: one expert at a time
            out = torch.zeros_like(hidden)
            for token in range(hidden.shape[0]):
                for slot in range(index.shape[1]):
                    expert = index[token, slot]
                    y = (hidden[token] @ self.w_in[expert]).relu().square() @ self.w_out[expert]
                    out[token] = out[token] + weights[token, slot] * y
            return out

    torch.manual_seed(0)
    hidden, index, weights = torch.randn(10, 16), torch.randint(0, 3, (10, 2)), torch.rand(10, 2)
    reference = Relu2Experts()
    expected = reference(hidden, index, weights)
    expected.sum().backward()
    for kernel in ("grouped_mm", "loop"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), Relu2Experts())
        model[1].load_state_dict(reference.state_dict())
        assert install_experts(model, kinds, kernel) == [model[1]]
        got = model[1](hidden, index, weights)
        got.sum().backward()
        rtol, atol = f32_tol(expected, terms=16 + 8, depth=6)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
        for name in ("w_in", "w_out"):
            grad = getattr(reference, name).grad
            rtol, atol = f32_tol(grad, terms=16 + 8 + 10, depth=6)
            torch.testing.assert_close(getattr(model[1], name).grad, grad, rtol=rtol, atol=atol)


def optimizers(examples, cli, automodel_plugin, workdir):
    """The plugin's optimizer trains with its options, its range is enforced, and its state
    resumes exactly from a checkpoint."""
    run_all(cli, automodel_plugin, examples["register_optimizers"])
    run = workdir / "runs" / "lion"
    saved = (run / "config.yaml").read_text()
    assert "name: lion" in saved and "beta2: 0.98" in saved and "beta1: 0.9" in saved
    assert len(metrics(run)) == 2
    refused(cli("finetune", "demo", "optim.name=lion", "optim.lion.beta2=1", *FAST), "optim.lion.beta2")

    resumed = workdir / "runs" / "lion-resume"
    args = ("finetune", "demo", "optim.name=lion", "-o", str(resumed), *FAST, "train.max_steps=3",
            "checkpoint.every_steps=1")
    assert cli(*args).exit_code == 0
    first, weights = [m["loss"] for m in metrics(resumed)], (resumed / "final" / "model.safetensors").read_bytes()
    assert cli(*args, f"checkpoint.resume={resumed / 'checkpoints' / 'step_00000002'}").exit_code == 0
    assert [m["loss"] for m in metrics(resumed)] == first and len(first) == 3
    assert (resumed / "final" / "model.safetensors").read_bytes() == weights


def schedulers(examples, cli, automodel_plugin, workdir):
    """The plugin's schedule sets the rate of every step from its options."""
    run_all(cli, automodel_plugin, examples["register_schedulers"])
    steps = metrics(workdir / "runs" / "step")
    peak = steps[0]["lr"]
    assert [step["lr"] for step in steps] == pytest.approx([peak, peak / 2], rel=1e-12)
    refused(cli("finetune", "demo", "optim.scheduler=step_decay", "optim.step_decay.every=0", *FAST),
            "optim.step_decay.every")


def testing_a_plugin(examples, cli, automodel_plugin, workdir):
    """The page's pytest module passes, each test with a fixture of its own."""
    path = examples["Testing a plugin"].root / "tests" / "test_my_plugin.py"
    spec = importlib.util.spec_from_file_location("doc_test_my_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [function for name, function in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 2
    for number, test in enumerate(tests):
        fixture = PluginFixture()
        try:
            arguments = {"automodel_plugin": fixture, "tmp_path": workdir / f"test{number}"}
            test(**{name: arguments[name] for name in inspect.signature(test).parameters})
        finally:
            fixture.close()


#: section of docs/plugins.md -> the test of its example.
EXAMPLE_TESTS = {
    "Quick start": quick_start,
    "register_recipes": recipes,
    "register_models": models,
    "register_datasets": datasets_,
    "register_losses": losses,
    "register_parallel_plans": parallel_plans,
    "register_launchers": launchers,
    "register_loggers": loggers,
    "register_moe_blocks": moe_blocks,
    "register_optimizers": optimizers,
    "register_schedulers": schedulers,
    "Testing a plugin": testing_a_plugin,
}


@pytest.mark.parametrize("section", list(EXAMPLE_TESTS))
def test_doc_example(section, examples, cli, automodel_plugin, workdir, request):
    check = EXAMPLE_TESTS[section]
    fixtures = {"examples": examples, "cli": cli, "automodel_plugin": automodel_plugin, "workdir": workdir}
    if "tmp_path_factory" in inspect.signature(check).parameters:
        fixtures["tmp_path_factory"] = request.getfixturevalue("tmp_path_factory")
    check(**fixtures)


def test_every_code_block_is_marked_and_every_example_is_tested():
    text = DOC.read_text()
    unmarked = [block.text.splitlines()[0] for block in code_blocks(text) if block.language == "python"
                and "fragment" not in block.words and not any(w.startswith("file=") for w in block.words)]
    assert not unmarked, f"python blocks neither run (file=) nor marked `fragment`: {unmarked}"
    examples = parse_examples(text)
    assert set(examples) == set(EXAMPLE_TESTS)
    packages = [example.package for example in examples.values()]
    assert len(packages) == len(set(packages)), packages
    hooks = [section for section in examples if section.startswith("register_")]
    from automodel_cli.registry import REGISTRY_HOOKS

    assert sorted(hooks) == sorted(REGISTRY_HOOKS), "every hook has a runnable example"


# --------------------------------------------------------------- examples that start processes
def tiny_olmo_config():
    from transformers import OlmoConfig

    return OlmoConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def write_tiny_olmo(directory: Path) -> None:
    """A small OLMo config with the demo's tokenizer (the demo preset initialises it at random)."""
    import shutil

    from automodel_cli.assets import demo_dir

    tiny_olmo_config().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(demo_dir() / name, directory / name)


def install_example(example: Example, site: Path) -> dict[str, str]:
    """pip-install an example that shows no pyproject.toml of its own, under its package's name."""
    (example.root / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{example.package.replace("_", "-")}"\nversion = "0.0.1"\n'
        f'[project.entry-points.automodel]\n{example.package} = "{example.package}"\n'
        f'[tool.setuptools]\npackages = ["{example.package}"]\n')
    return install_plugins(site, example.root)


@pytest.mark.slow
def test_parallel_plan_example_trains_with_tensor_parallelism(examples, workdir, tmp_path_factory):
    """Two processes with tp=2 use the plan (installed: each torchrun process loads it) and
    compute the single process's step-1 loss, to float32 rounding."""
    example = examples["register_parallel_plans"]
    env = install_example(example, tmp_path_factory.mktemp("site"))
    write_tiny_olmo(workdir / "tiny-olmo")
    (args,) = example.commands
    result = run_cli(*args, *FAST, env=env, cwd=workdir)
    assert result.exit_code == 0, result.stderr
    assert "tp=2 = 2 process(es)" in result.stdout
    single = run_cli("finetune", "demo", "model.path=./tiny-olmo", "-o", "runs/olmo-1", *FAST, env=env, cwd=workdir)
    assert single.exit_code == 0, single.stderr
    sharded, whole = metrics(workdir / "runs" / "olmo-tp")[0], metrics(workdir / "runs" / "olmo-1")[0]
    tolerance = first_loss_tolerance(whole["loss"], layers=2, hidden=64, intermediate=128, vocab=64, positions=64,
                                     tokens=whole["label_tokens"])
    assert sharded["loss"] == pytest.approx(whole["loss"], **tolerance)


@pytest.mark.slow
def test_launcher_example_runs_tracks_and_reports_a_job(examples, cli, automodel_plugin, workdir):
    """The page's commands in order: the job starts in the background, `launch status` follows
    it, `launch logs --follow` waits for it, and the run's outputs are there."""
    example = examples["register_launchers"]
    registries = register(automodel_plugin, example)
    results = [run_in_process(cli, registries, args) for args in example.commands]
    started, status, logs = results[1:]
    assert "in the background (pid " in started.stdout and "automodel launch logs" in started.stdout
    assert "running" in status.stdout or "finished, exit code 0" in status.stdout
    assert "saved " in logs.stdout
    run = workdir / "runs" / "bg"
    assert "finished, exit code 0" in cli("launch", "status", str(run)).stdout
    assert (run / "final" / "config.json").exists() and (run / "launch" / "job.log").exists()
    refused(cli("launch", "cancel", str(run)), "is not running (finished, exit code 0)")
