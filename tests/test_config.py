"""Config layering, typed overrides, provenance and validation errors."""

from __future__ import annotations

import pytest

from automodel_cli import hookimpl
from automodel_cli.config import ConfigError, layer_from_file, layer_from_overrides, resolve
from automodel_cli.config.assemble import build_layers, resolve_command
from automodel_cli.config.resolve import Layer, defaults_layer
from automodel_cli.errors import UserError
from automodel_cli.plugin_host import get_registries
from conftest import run_cli


def composed(recipe: str = "finetune"):
    """The schema a recipe's command validates against (core + its sections + option tables)."""
    from automodel_cli.config.compose import compose_schema

    registries = get_registries()
    return compose_schema(registries, registries.recipes.get(recipe))


def write(path, text):
    path.write_text(text)
    return str(path)


def test_layers_later_wins_and_sources_are_recorded(tmp_path):
    first = write(tmp_path / "a.yaml", "train:\n  max_steps: 10\n  seed: 1\noptim:\n  lr: 0.001\n")
    second = write(tmp_path / "b.yaml", "train:\n  max_steps: 20\n")
    registries = get_registries()
    recipe_defaults = Layer(label="recipe test", data={"train": {"seed": 0, "epochs": 3}})
    layers = [defaults_layer(), recipe_defaults]
    layers += build_layers(registries, recipe=None, target="qwen3", config_files=[first, second],
                           overrides=["train.max_steps=30", "optim.lr=5e-4"])[1:]
    cfg = resolve(layers)
    assert cfg.train.max_steps == 30
    assert cfg.optim.lr == 5e-4
    assert cfg.train.seed == 1  # file beats recipe defaults
    assert cfg.train.epochs == 3  # recipe beats schema defaults
    assert cfg.model.path == "Qwen/Qwen3-0.6B"  # preset
    assert cfg.train.micro_batch_size == 2  # schema default
    assert str(cfg.source_of("train.seed")) == f"{first}:3"
    assert "command line `train.max_steps=30`" in str(cfg.source_of("train.max_steps"))
    assert str(cfg.source_of("train.epochs")) == "recipe test"
    assert str(cfg.source_of("model.path")).startswith("preset qwen3 (automodel-cli")



class PresetWithRecipeDefaults:
    @staticmethod
    @hookimpl
    def register_models(registry):
        registry.add("tiny-test", path="org/tiny", family="llama",
                     defaults={"data": {"max_length": 64}, "train": {"seed": 7}},
                     recipe_defaults={"pretrain": {"data": {"max_length": 256}, "model": {"config": {"num_hidden_layers": 1}}}})


def test_preset_recipe_defaults_apply_with_that_recipe_only(automodel_plugin, tmp_path):
    registries = automodel_plugin(PresetWithRecipeDefaults(), name="preset-with-recipe-defaults")
    config_file = write(tmp_path / "run.yaml", "model:\n  config:\n    hidden_size: 32\n")

    def resolved(recipe: str, overrides: list[str]):
        return resolve_command(registries, recipe=registries.recipes.get(recipe), target="tiny-test",
                               config_files=[config_file], overrides=overrides)

    pretrain = resolved("pretrain", [])
    assert pretrain.data.max_length == 256 and pretrain.train.seed == 7  # on top of the preset's defaults
    assert pretrain.model.config.to_dict() == {"num_hidden_layers": 1, "hidden_size": 32}  # merged with the file
    assert str(pretrain.source_of("data.max_length")).startswith("preset tiny-test for pretrain (")
    assert resolved("pretrain", ["data.max_length=128"]).data.max_length == 128  # overrides still win
    finetune = resolved("finetune", [])
    assert finetune.data.max_length == 64 and finetune.model.config.to_dict() == {"hidden_size": 32}


def test_override_values_are_typed():
    layer = layer_from_overrides([
        "train.max_steps=7", "optim.lr=1e-4", "data.packing=true", "optim.betas=[0.8, 0.9]",
        "train.eval_every_steps=null", "model.config.num_hidden_layers=2", "output_dir=2024",
        "train.activation_checkpointing=false", "checkpoint.resume=true", "peft.target_modules=[q_proj]",
    ])
    cfg = resolve([defaults_layer(), layer])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.eval_every_steps is None
    assert cfg.model.config.num_hidden_layers == 2
    assert cfg.output_dir == "2024"  # a string key keeps the text as written
    # a key that takes a string or a bool keeps the bool (not the truthy text "false")
    assert cfg.train.activation_checkpointing is False and cfg.checkpoint.resume is True
    assert cfg.peft.target_modules == ["q_proj"]
    selective = resolve([defaults_layer(), layer_from_overrides(["train.activation_checkpointing=selective"])])
    assert selective.train.activation_checkpointing == "selective"


def test_all_problems_reported_with_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "bad.yaml",
                 "train:\n  max_step: 3\n  micro_batch_size: two\npeft:\n  method: lora2\nmodle:\n  path: x\n")
    with pytest.raises(ConfigError) as info:
        resolve([defaults_layer(), layer_from_file(path)])
    problems = info.value.problems
    assert len(problems) == 4
    text = info.value.render()
    assert f"{path}:2: unknown key `train.max_step`. Did you mean `train.max_steps`?" in text
    assert f"{path}:3: `train.micro_batch_size` must be an integer, got 'two'" in text
    assert f"{path}:5: `peft.method` must be one of none, lora, dora" in text
    assert "Did you mean `lora`?" in text
    assert f"{path}:6: unknown key `modle`. Did you mean `model`?" in text


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="must be an integer or null, got True"):
        resolve([defaults_layer(), layer_from_overrides(["train.max_steps=true"])])


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "train:\n  max_steps: 3\n   seed: 4\n")
    with pytest.raises(UserError, match=r"broken.yaml line 3, column \d+: this is not valid YAML"):
        layer_from_file(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        layer_from_file(str(tmp_path / "nope.yaml"))
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        layer_from_file(path)


def test_override_without_equals_is_an_error():
    with pytest.raises(UserError, match="written key=value"):
        layer_from_overrides(["=3"])


def test_registry_names_are_checked():
    with pytest.raises(ConfigError) as info:
        resolve_command(get_registries(), recipe=None, target=None, config_files=[],
                        overrides=["loss.name=maskd_ce"])
    assert "Did you mean `masked_ce`?" in info.value.render()


def test_secrets_are_redacted_in_yaml():
    schema = composed()
    layer = layer_from_overrides(["data.options.hf_token=abc123", "data.options.name=p"], schema)
    cfg = resolve([defaults_layer(schema), layer], schema)
    text = cfg.to_yaml()
    assert "abc123" not in text and "<redacted>" in text and "name: p" in text
    assert cfg.data.options.hf_token == "abc123"  # still usable in the run itself


def test_config_show_cli_prints_sources(tmp_path):
    path = write(tmp_path / "run.yaml", "train:\n  max_steps: 12\n")
    result = run_cli("config", "show", "llama3", "-c", path, "optim.lr=3e-4")
    assert result.exit_code == 0, result.stderr
    assert f"max_steps: 12  # from {path}:2" in result.stdout
    assert "path: meta-llama/Llama-3.2-1B-Instruct  # from preset llama3" in result.stdout
    assert "lr: 0.0003 # from command line `optim.lr=3e-4`" in " ".join(result.stdout.split())  # not optim's first key


def test_config_validate_cli(tmp_path):
    good = write(tmp_path / "good.yaml", "train:\n  max_steps: 12\n")
    result = run_cli("config", "validate", good)
    assert result.exit_code == 0 and "OK" in result.stdout
    bad = write(tmp_path / "bad.yaml", "train:\n  max_stepz: 12\n  seed: x\n")
    result = run_cli("config", "validate", bad)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert "2 problems" in result.stderr and "train.max_steps" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["config", "show", "lama3"], "Unknown model preset `lama3`"),
    (["config", "show", "missing.yaml"], "does not exist"),
    (["config", "show", "llama3", "extra"], "Unexpected argument `extra`"),
])
def test_cli_errors_exit_2_without_traceback(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- ranges
OUT_OF_RANGE = [
    ("train.max_steps", "-1", ">= 1"), ("train.max_steps", "0", ">= 1"),
    ("train.micro_batch_size", "0", ">= 1"), ("train.global_batch_size", "0", ">= 1"),
    ("train.epochs", "0", ">= 1"), ("train.seed", "-3", "0 <= x <= 4294967295"),
    ("train.max_grad_norm", "0", "> 0"), ("train.eval_every_steps", "0", ">= 1"),
    ("optim.lr", "-1", "> 0"), ("optim.lr", ".nan", "finite"), ("optim.lr", ".inf", "finite"),
    ("optim.weight_decay", "-0.1", ">= 0"), ("optim.eps", "0", "> 0"), ("optim.min_lr_ratio", "1.5", "0 <= x <= 1"),
    ("optim.warmup_steps", "-5", ">= 0"), ("optim.betas", "[0.9]", "two numbers"),
    ("optim.betas", "[0.9, 1.0]", "two numbers"), ("peft.rank", "0", ">= 1"), ("peft.dropout", "1", "0 <= x < 1"),
    ("peft.alpha", "0", "> 0"), ("data.max_length", "1", ">= 2"), ("data.eval_size", "-1", "integer >= 0"),
    ("data.eval_size", "1.5", "fraction 0 <= x < 1"), ("distributed.tp", "0", ">= 1"),
    ("distributed.dp_shard", "0", "-1"), ("distributed.dp_replicate", "0", ">= 1"),
    ("checkpoint.every_steps", "0", ">= 1"), ("checkpoint.keep", "0", ">= 1"),
    ("distill.temperature", "0", "> 0"), ("distill.kd_weight", "2", "0 <= x <= 1"),
    ("launch.nodes", "0", ">= 1"), ("launch.rdzv_port", "70000", "1 <= x <= 65535"),
    ("train.peak_tflops", "0", "> 0"),
]


@pytest.mark.parametrize("key, value, bound", OUT_OF_RANGE)
def test_numbers_out_of_range_name_key_value_and_range(key, value, bound):
    schema = composed("distill" if key.startswith("distill.") else "finetune")
    with pytest.raises(ConfigError) as caught:
        resolve([defaults_layer(schema), layer_from_overrides([f"{key}={value}"], schema)], schema)
    (problem,) = caught.value.problems
    assert problem.key == key and f"`{key}`" in problem.message and bound in problem.message
    assert f"command line `{key}={value}`" in str(problem)


def test_every_range_problem_is_reported_at_once_with_exit_2(tmp_path):
    config = write(tmp_path / "run.yaml", "train:\n  max_steps: -1\n  micro_batch_size: 0\noptim:\n  lr: -1\n")
    result = run_cli("finetune", "demo", "-c", config, "train.global_batch_size=0", "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "4 problems" in result.stderr
    assert f"{config}:2: `train.max_steps` must be >= 1 (or null), got -1." in result.stderr
    assert f"{config}:3: `train.micro_batch_size` must be >= 1, got 0." in result.stderr
    assert f"{config}:5: `optim.lr` must be > 0 (or null), got -1." in result.stderr
    assert "`train.global_batch_size` must be >= 1, got 0." in result.stderr


def test_values_inside_the_range_pass():
    cfg = resolve([defaults_layer(), layer_from_overrides([
        "train.max_steps=1", "optim.lr=1e-9", "optim.min_lr_ratio=1", "peft.dropout=0", "data.eval_size=0.5",
        "data.eval_size=10", "distributed.dp_shard=-1", "optim.warmup_steps=0.1", "train.max_grad_norm=null"])])
    assert cfg.train.max_steps == 1 and cfg.data.eval_size == 10 and cfg.train.max_grad_norm is None


def test_documented_ranges_come_from_the_schema():
    from automodel_cli.config.schema import CORE_SCHEMA

    reference = composed().markdown()
    assert "| `train.max_steps` | an integer or null (>= 1) |" in reference
    assert "(0 <= x < 1)" in reference  # peft.dropout
    assert "| `loss.linear_ce.chunk_size` | an integer or null (>= 1) |" in reference  # an entry's option
    assert CORE_SCHEMA.lookup("optim.betas").range_text() == "two numbers 0 <= b < 1"


# --------------------------------------------------------------------------- secrets
def test_secret_values_are_redacted_in_every_printed_source(tmp_path):
    secret = "wb_0123456789abcdef"
    result = run_cli("config", "show", "demo", f"data.options.api_key={secret}", "train.max_steps=5")
    assert result.exit_code == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "api_key: <redacted>  # from command line `data.options.api_key=<redacted>`" in result.stdout
    # ... and in error messages naming the override, and in the refusal of a W&B key in the config
    for bad in ([f"data.options.api_key={secret}", "train.max_steps=-1"], [f"logging.wandb.api_key={secret}"]):
        refused = run_cli("finetune", "demo", *bad, "--dry-run")
        assert refused.exit_code == 2 and secret not in refused.stdout + refused.stderr
    assert "export WANDB_API_KEY or run `wandb login`" in refused.stderr


def test_a_secret_value_of_the_wrong_type_is_not_repeated():
    from automodel_cli.config.resolve import value_problem
    from automodel_cli.config.schema import Key

    secret = value_problem("launch.env.HF_TOKEN", 12345, Key((str,), None, "token"))
    plain = value_problem("launch.env.HOME", 12345, Key((str,), None, "home"))
    assert "12345" not in secret and "<redacted>" in secret
    assert "12345" in plain


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize("args", [["train.max_steps"], ["demo", "train.max_steps"], ["demo", "optim"]])
def test_an_override_without_equals_says_so(args):
    result = run_cli("finetune", *args, "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    missing = args[-1]
    assert f"`{missing}` looks like a config override missing `=`" in result.stderr
    assert f"{missing}=VALUE" in result.stderr and "Unknown model preset" not in result.stderr


def test_only_whole_credential_words_are_redacted():
    """`model.tokenizer` is a path, not a token: launched jobs read it from the saved config."""
    schema = composed("distill")
    cfg = resolve([defaults_layer(schema), layer_from_overrides([
        "model.tokenizer=org/tok", "distill.teacher_tokenizer=org/teacher-tok", "data.options.api_key=k1",
        "launch.env.HF_TOKEN=t1", "launch.env.TOKENIZERS_PARALLELISM=false", "data.options.auth_token=t2"], schema)],
        schema)
    saved = cfg.redacted()
    assert saved["model"]["tokenizer"] == "org/tok" and saved["distill"]["teacher_tokenizer"] == "org/teacher-tok"
    assert saved["launch"]["env"]["TOKENIZERS_PARALLELISM"] is False
    assert saved["data"]["options"]["api_key"] == saved["launch"]["env"]["HF_TOKEN"] == "<redacted>"
    assert saved["data"]["options"]["auth_token"] == "<redacted>"
