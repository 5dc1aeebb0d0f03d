"""Credentials in a launched job: one rule for every launcher.

A launcher writes the job down before it runs: a batch script, a manifest, a frozen config, a
job record, the ``--dry-run`` output. Anyone who can read the job directory (or, on Kubernetes,
the job object) can read them, and a saved config has credential-looking values ``<redacted>``,
so a process reading it would get that placeholder instead of the token. So a credential never
goes into a job as a literal: ``build_spec`` refuses it before anything is written or printed,
names the setting (never the value) and says how this launcher passes credentials instead
(``Launcher.secret_hint``).

What counts as a credential:

* in ``launch.env``: a variable whose *name* says so (``HF_TOKEN``, ``WANDB_API_KEY``,
  ``*_PASSWORD``, ``*_SECRET*``, ``*_CREDENTIALS``, ``*_ACCESS_KEY*`` ...) with a literal value,
  or any variable whose *value* has the shape of a known token (``hf_...``, ``sk-...``,
  ``ghp_...``, ``github_pat_...``, ``glpat-...``, ``xox?-...``, AWS ``AKIA...``/``ASIA...``, or
  40 hex digits in a ``WANDB*`` variable). A reference, ``$NAME`` or ``${NAME}``, is no
  credential: launchers whose job runs ``launch.env`` through a shell (``Launcher.shell_env``,
  e.g. Slurm's batch script) expand it on the node when the job starts. Elsewhere (a Kubernetes
  manifest is not a shell) a credential-named variable is refused whatever its value.
* in ``launch.setup``: a token-shaped word, or ``NAME=literal`` for a credential name (``NAME=$(cat
  FILE)`` reads it at run time and is fine).
* anywhere else in the config, when the job's processes read the frozen copy of it (every launch
  but the local launcher's single process): a literal under a credential-looking key
  (``logging.wandb.api_key``, ``data.options.token``) or a token-shaped value.

No torch here: this runs on a login node before anything is submitted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from automodel_cli.config.secrets import REDACTED, is_secret_name

#: Token formats recognised by their value alone (what each one is, for the message).
TOKEN_FORMATS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("an API key (sk-...)", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("a GitHub token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
)
#: Weights & Biases API keys are 40 hex digits, like a git commit: recognised in WANDB* variables only.
WANDB_KEY = re.compile(r"[0-9a-f]{40}")
#: A reference to a variable, ``${NAME}`` (group 1) or ``$NAME`` (group 2).
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
#: ``NAME=value`` assignments in a shell line (``export NAME=value`` included).
ASSIGNMENT = re.compile(r"(?:^|[\s;&|(])([A-Za-z_][A-Za-z0-9_]*)=(\S*)")


@dataclass(frozen=True)
class Secret:
    """A credential found in the config: where (a dotted key) and why; never its value."""

    key: str
    why: str
    value: str  # only for taking it out of messages (sources can quote the command line)


def is_reference(value: str) -> bool:
    """``$NAME`` or ``${NAME}`` and nothing else."""
    return REFERENCE.fullmatch(value.strip()) is not None


def references(value: str) -> list[str]:
    """Names of the variables ``value`` refers to (``$$`` is a literal ``$``, no reference)."""
    return [match.group(1) or match.group(2) for match in REFERENCE.finditer(value.replace("$$", ""))]


def token_format(value: str, name: str = "") -> str | None:
    """What kind of token ``value`` looks like, or None."""
    for what, pattern in TOKEN_FORMATS:
        if pattern.search(value):
            return what
    if "WANDB" in name.upper() and WANDB_KEY.fullmatch(value.strip()):
        return "a Weights & Biases API key"
    return None


def env_secrets(env: dict[str, str], *, references_expand: bool) -> list[Secret]:
    """Credentials in ``launch.env`` (values already strings)."""
    found = []
    for name, value in env.items():
        key = f"launch.env.{name}"
        shape = token_format(value, name)
        if shape:
            found.append(Secret(key, f"its value looks like {shape}", value))
        elif is_secret_name(name) and value.strip():
            if not references_expand:
                found.append(Secret(key, "its name marks a credential (values reach the job's processes as "
                                         "written: a reference to a variable is not expanded)", value))
            elif not is_reference(value):
                found.append(Secret(key, "its name marks a credential and its value is a literal, not a "
                                         "reference such as ${" + name + "}", value))
    return found


def setup_secrets(setup: list[str]) -> list[Secret]:
    """Credentials written into ``launch.setup`` lines."""
    found = []
    for number, line in enumerate(setup):
        key = f"launch.setup[{number}]"
        shape = token_format(line)
        if shape:
            found.append(Secret(key, f"the line contains {shape}", _token_in(line)))
            continue
        for name, value in ASSIGNMENT.findall(line):
            literal = value.strip("'\"")
            if is_secret_name(name) and literal and "$" not in value and "`" not in value:
                found.append(Secret(key, f"the line sets {name} to a literal value", literal))
                break
    return found


def config_secrets(tree: dict[str, Any]) -> list[Secret]:
    """Literal credentials anywhere in the config but ``launch.env``/``launch.setup``. Launcher
    options are read by the launcher, not the job's processes, and name credentials rather than
    hold them (``launch.k8s.secret_env: {WANDB_API_KEY: wandb/api-key}``): only token-shaped
    values count there."""
    found = []
    for dotted, name, value in _leaves(tree, ""):
        if dotted.startswith(("launch.env.", "launch.setup")) or not isinstance(value, str) or not value.strip():
            continue
        shape = token_format(value, name)
        if shape:
            found.append(Secret(dotted, f"its value looks like {shape}", value))
        elif is_secret_name(name) and value != REDACTED and not dotted.startswith("launch."):
            found.append(Secret(dotted, "its key marks a credential", value))
    return found


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{index}]")
    else:
        yield prefix, prefix.rsplit(".", 1)[-1], node


def _token_in(line: str) -> str:
    for _what, pattern in TOKEN_FORMATS:
        match = pattern.search(line)
        if match:
            return match.group(0)
    return line


def without(text: str, secrets: list[Secret]) -> str:
    """``text`` with every secret value replaced by ``<redacted>`` (sources quote the command line)."""
    for secret in secrets:
        if secret.value:
            text = text.replace(secret.value, REDACTED)
    return text


def refuse_credentials(cfg: Any, spec: Any, launcher: Any) -> None:
    """Raise a UserError naming every credential written into the job (never its value) and how
    this launcher passes credentials instead; nothing has been written or printed yet."""
    from automodel_cli.errors import UserError

    found = env_secrets(spec.env, references_expand=launcher.shell_env) + setup_secrets(spec.setup)
    if launcher.uses_frozen_config(spec):
        found += config_secrets(cfg.tree)
    if not found:
        return
    lines = []
    for secret in found:
        source = cfg.source_of(secret.key) or cfg.source_of(secret.key.split("[")[0])
        where = f" ({without(str(source), found)})" if source else ""
        lines.append(f"`{secret.key}`{where}")
    if len(found) == 1:
        head = f"{lines[0]} holds a credential: {found[0].why}."
    else:
        items = "\n".join(f"  - {line}: {secret.why}" for line, secret in zip(lines, found))
        head = f"{len(found)} settings hold credentials:\n{items}\n"
    message = (f"{head} The {launcher.name} launcher does not write credentials into a job: what it writes "
               "and prints for one (script or manifest, frozen config, job record, --dry-run output) can be read "
               "by anyone who can read the job, and a saved config has them <redacted>, which the job's "
               "processes would take for the value.")
    names = [s.key.removeprefix("launch.env.") for s in found if s.key.startswith("launch.env.")]
    example = names[0] if names else "HF_TOKEN"
    other = "" if names else ("Libraries read credentials from the environment (HF_TOKEN for the Hugging Face "
                              "hub, WANDB_API_KEY for Weights & Biases). ")
    raise UserError(message, other + launcher.secret_hint(example))
