"""The Kubernetes launcher: one manifest per job, applied with ``kubectl``.

``--launcher k8s`` turns the resolved recipe config into a multi-document manifest:

* a **ConfigMap** ``NAME-config`` holding the frozen config every pod reads (credentials are
  refused before anything is rendered: they come from Secrets, see launch/secrets.py;
  ``output_dir`` set to a path on the shared volume, ``checkpoint.resume=auto`` so a restarted
  pod continues from the latest checkpoint);
* with ``launch.k8s.kind: pytorchjob`` (default) a Kubeflow **PyTorchJob** (one ``Master`` and
  ``nodes - 1`` ``Worker`` replicas; the training operator sets ``MASTER_ADDR``/``RANK`` and
  creates the services between them);
* with ``launch.k8s.kind: indexed-job`` (clusters without the operator) a headless **Service**
  and an **indexed batch/v1 Job**: pod ``i`` has hostname ``NAME-i`` under the Service's
  subdomain, so every node reaches node 0 at ``NAME-0.NAME``; the node rank is the completion
  index ``$JOB_COMPLETION_INDEX``.

Every pod runs ``torchrun`` (``python -m torch.distributed.run``) with a c10d rendezvous on node
0 and the recipe's frozen config, after the ``launch.setup`` lines. ``--dry-run`` prints the
manifest and writes nothing; a real launch keeps ``launch/manifest.yaml``, ``launch/config.yaml``
and ``launch/job.json`` in the local job directory (the run's outputs live on the cluster volume)
and runs ``kubectl apply``. ``automodel launch status|logs|cancel`` ask kubectl about the job.

No torch and no Kubernetes client here: rendering must work on any laptop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel_cli.components.launch.base import (
    FROZEN_CONFIG,
    JobRecord,
    Launcher,
    LaunchSpec,
    _first_source,
    print_follow_commands,
    require_binary,
    run_tool,
)
from automodel_cli.config.schema import OPT_INT, OPT_STR, Key, NoneType, _k
from automodel_cli.config.yaml_io import write_text_atomic
from automodel_cli.errors import UserError, did_you_mean

MANIFEST = "manifest.yaml"
KINDS = ("pytorchjob", "indexed-job")
#: The operator only wires up (env, ports) the container called ``pytorch``; the indexed Job
#: uses the same name so ``kubectl logs -c pytorch`` works for both kinds.
CONTAINER = "pytorch"
CONFIG_MOUNT = "/etc/automodel"
#: Labels put on every object and pod, used to select a job's pods for ``launch logs``.
JOB_LABEL = "automodel-cli/job"
ROLE_LABEL = "automodel-cli/role"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # set by Kubernetes >= 1.28
#: A ConfigMap holds at most 1 MiB.
CONFIGMAP_LIMIT = 1024 * 1024
KUBECTL_HINT = ("Install kubectl (https://kubernetes.io/docs/tasks/tools/) and point it at your "
                "cluster (KUBECONFIG or ~/.kube/config), or use --dry-run to print the manifest "
                "and apply it yourself.")
DOCS = "docs/launch.md (section Kubernetes) describes every launch.k8s option."


QUANTITY = (str, int, float, NoneType)
NAMES = (list, str)

#: ``launch.k8s.*``: what a job's pods look like. docs/launch.md has the same table.
OPTIONS: dict[str, Key] = {
    # what runs, and where
    "image": _k(OPT_STR, None, "Container image with automodel-cli, torch and CUDA installed (required)."),
    "image_pull_policy": _k(OPT_STR, None, "Always, IfNotPresent or Never (default: the cluster's rule).",
                            choices=("Always", "IfNotPresent", "Never")),
    "image_pull_secrets": _k(NAMES, [], "Secrets (docker-registry type) used to pull a private image."),
    "namespace": _k(str, "default", "Namespace of the job."),
    "context": _k(OPT_STR, None, "kubectl context (cluster) to use; default: kubectl's current context."),
    "kind": _k(str, "pytorchjob", "pytorchjob (Kubeflow training operator) or indexed-job "
               "(plain batch/v1 Job + headless Service, no operator needed).", choices=KINDS),
    # storage
    "pvc": _k(OPT_STR, None, "PersistentVolumeClaim mounted at mount_path on every pod; holds outputs, "
              "checkpoints and the HF cache (ReadWriteMany for several nodes). Required when nodes > 1."),
    "mount_path": _k(str, "/workspace", "Where the pvc is mounted in the pods."),
    "output_dir": _k(OPT_STR, None, "The run's output directory inside the pods; default "
                     "{mount_path}/runs/{job name}."),
    "extra_pvcs": _k(dict, {}, "More claims to mount: {claim-name: /mount/path} (datasets, models)."),
    "hf_home": _k(OPT_STR, None, "HF_HOME in the pods; default {mount_path}/.cache/huggingface when a pvc is "
                  "mounted (downloads are shared and survive restarts); '' leaves it unset."),
    "shm_size": _k(QUANTITY, "16Gi", "Size of the in-memory /dev/shm (NCCL and data loader workers need more "
                   "than the container's 64 MB; it counts as the pod's memory); null: no size limit."),
    # resources and placement
    "cpu": _k(QUANTITY, None, "CPU request per node (pod), e.g. 32 or 500m."),
    "memory": _k(QUANTITY, None, "Memory request and limit per node (pod), e.g. 256Gi."),
    "gpu_resource": _k(str, "nvidia.com/gpu", "Extended resource name of a GPU; limits get "
                       "launch.gpus_per_node of it (none when 0)."),
    "node_selector": _k(dict, {}, "Node labels a pod must match, e.g. "
                        "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}."),
    "tolerations": _k(list, [], "Taints the pods tolerate: mappings (key, operator, value, effect) or "
                      "'key[=value]:Effect' strings, e.g. nvidia.com/gpu:NoSchedule."),
    "priority_class": _k(OPT_STR, None, "PriorityClass of the pods."),
    "scheduler_name": _k(OPT_STR, None, "Scheduler of the pods (e.g. volcano); default: the cluster's."),
    "labels": _k(dict, {}, "Labels on every object and pod (e.g. kueue.x-k8s.io/queue-name: team-a)."),
    "annotations": _k(dict, {}, "Annotations on the job and its pods."),
    "service_account": _k(OPT_STR, None, "ServiceAccount of the pods (e.g. for cloud storage access)."),
    # environment and secrets
    "env_from_secrets": _k(NAMES, [], "Secrets whose keys all become environment variables (envFrom), e.g. a "
                           "secret with HF_TOKEN and WANDB_API_KEY. Tokens never go into the manifest."),
    "secret_env": _k(dict, {}, "Single variables from secrets: {VAR: secret-name/key} (key defaults to VAR)."),
    "python": _k(str, "python", "Python interpreter in the image that runs torchrun (a shell word, e.g. "
                 "/opt/venv/bin/python)."),
    "shell": _k(str, "/bin/bash", "Shell in the image that runs launch.setup and then torchrun."),
    "working_dir": _k(OPT_STR, None, "Working directory of the container (relative paths in the config "
                      "resolve from it); default: the image's."),
    # restarts and lifetime
    "restart_policy": _k(str, "OnFailure", "OnFailure (restart a failed container in place), Never (a new pod "
                         "replaces a failed one) or ExitCode (pytorchjob only: restart on exit codes 128+).",
                         choices=("OnFailure", "Never", "ExitCode")),
    "backoff_limit": _k(int, 3, "Restarts allowed before the job is marked failed (each resumes from the latest "
                        "checkpoint).", ge=0),
    "ttl_seconds_after_finished": _k(OPT_INT, None, "Delete the job (not the volume) this long after it ends; "
                                     "default: keep it so its status and logs stay readable.", ge=0),
    "active_deadline_seconds": _k(OPT_INT, None, "Stop the job after this many seconds of running.", ge=1),
    "termination_grace_period_seconds": _k(int, 300, "Time a pod gets after SIGTERM (preemption, cancel) to "
                                           "save a checkpoint before it is killed.", ge=0),
}


# ------------------------------------------------------------------------------ names
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
SECRET_KEY_NAME = re.compile(r"[-._a-zA-Z0-9]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A resource quantity: a number with an optional binary (Ki..Ei), decimal (m, k, M..E) or
#: exponent suffix (Kubernetes' resource.Quantity grammar, without a sign).
QUANTITY_RE = re.compile(r"(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")


def is_quantity(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and QUANTITY_RE.fullmatch(value) is not None


def _quantity_hint(value: Any) -> str:
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTPE])i?B", text, re.IGNORECASE)
    if match:
        number, unit = match.groups()
        return f" Did you mean `{number}{unit.upper()}i`?"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtpe])i", text)
    if match:
        number, unit = match.groups()
        return f" Did you mean `{number}{unit.upper()}i`?"
    return ""


def dns_label_problem(value: str, what: str, max_len: int = 63, start_letter: bool = False) -> str | None:
    pattern = DNS1035_LABEL if start_letter else DNS1123_LABEL
    if not value:
        return f"{what} is empty."
    if len(value) > max_len:
        return f"{what} `{value}` is {len(value)} characters long; at most {max_len} are allowed."
    if pattern.fullmatch(value) is None:
        first = "start with a letter" if start_letter else "start with a letter or digit"
        return (f"{what} `{value}` is not a valid DNS-1123 name: use lowercase letters, digits and '-', "
                f"{first} and end with a letter or digit (e.g. `{safe_name(value, max_len)}`).")
    return None


def dns_subdomain_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty name, got {value!r}."
    if len(value) > 253 or DNS1123_SUBDOMAIN.fullmatch(value) is None:
        return (f"{what} `{value}` is not a valid Kubernetes object name (lowercase letters, digits, "
                f"'-' and '.', starting and ending with a letter or digit).")
    return None


def label_key_problem(key: Any, what: str) -> str | None:
    if not isinstance(key, str) or not key:
        return f"{what}: label key {key!r} must be a non-empty string."
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or DNS1123_SUBDOMAIN.fullmatch(prefix) is None):
        return f"{what}: the prefix `{prefix}` of label key `{key}` is not a DNS subdomain."
    if len(name) > 63 or LABEL_NAME.fullmatch(name) is None:
        return (f"{what}: label key `{key}` is invalid (a name of at most 63 letters, digits, '-', '_' "
                f"or '.', starting and ending with a letter or digit, after an optional DNS prefix/).")
    return None


def label_value_problem(value: Any, what: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"{what}: label value {value!r} must be a string."
    text = str(value)
    if text and (len(text) > 63 or LABEL_NAME.fullmatch(text) is None):
        return (f"{what}: label value `{text}` is invalid (at most 63 letters, digits, '-', '_' or '.', "
                f"starting and ending with a letter or digit).")
    return None


def safe_name(text: str, max_len: int = 63) -> str:
    """``text`` as a DNS-1035 label (lowercase, '-', starts with a letter) of at most ``max_len``.

    Too-long names keep their start and end with a short hash of the whole between, so names
    derived from timestamped job directories stay unique."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if not name or not name[0].isalpha():
        name = f"am-{name}".rstrip("-")
    if len(name) > max_len:
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        keep = max_len - len(digest) - 2
        head, tail = keep - keep // 2, keep // 2
        name = f"{name[:head].rstrip('-')}-{digest}-{name[len(name) - tail:].lstrip('-')}".rstrip("-")
        name = re.sub(r"-{2,}", "-", name)[:max_len].rstrip("-")
    return name


def _names(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _shell_word(arg: str) -> str:
    """Quote one argument for the pod's shell, keeping ``${VAR}`` references live."""
    if "${" in arg:
        if re.fullmatch(r"[-A-Za-z0-9_=:,./@+${}]+", arg) is None:
            raise ValueError(f"cannot quote {arg!r}")
        return f'"{arg}"'
    return shlex.quote(arg)


# ------------------------------------------------------------------------------ YAML
#: Strings YAML 1.1 (kubectl's reader) would read as booleans, numbers or null unless quoted.
_YAML11_SPECIAL = re.compile(
    r"(y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
    r"|~|null|Null|NULL|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?|[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)"
    r"([eE][-+]?[0-9]+)?|0x[0-9a-fA-F_]+|0o?[0-7_]+|0b[01_]+|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)|)")


def _yaml_ready(node: Any) -> Any:
    from ruamel.yaml.scalarstring import LiteralScalarString, SingleQuotedScalarString

    if isinstance(node, dict):
        return {key: _yaml_ready(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_yaml_ready(value) for value in node]
    if isinstance(node, str):
        if "\n" in node:
            return LiteralScalarString(node)
        if _YAML11_SPECIAL.fullmatch(node):
            return SingleQuotedScalarString(node)
    return node


def dump_manifest(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, in the layout ``kubectl get -o yaml`` uses."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    buffer = io.StringIO()
    yaml.dump_all([_yaml_ready(obj) for obj in objects], buffer)
    text = buffer.getvalue()
    return text if text.startswith("---") else "---\n" + text


# ------------------------------------------------------------------------------ the job
@dataclass
class K8sJob:
    """Everything about one Kubernetes job, derived from a LaunchSpec (nothing written)."""

    name: str
    namespace: str
    kind: str  # pytorchjob | indexed-job
    context: str | None
    output_dir: str  # inside the pods
    pvc: str | None
    config_text: str
    objects: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def resource(self) -> str:
        """The job's kubectl resource type (fully qualified, so CRDs named ``job`` don't clash)."""
        return "pytorchjob.kubeflow.org" if self.kind == "pytorchjob" else "job.batch"

    @property
    def log_selector(self) -> str:
        """The pod of node rank 0."""
        if self.kind == "pytorchjob":
            return f"{JOB_LABEL}={self.name},{ROLE_LABEL}=master"
        return f"{JOB_LABEL}={self.name},{INDEX_LABEL}=0"

    def manifest(self) -> str:
        return dump_manifest(self.objects)


def kubectl_base(kubectl: str, context: str | None) -> list[str]:
    return [kubectl, *(["--context", context] if context else [])]


class KubernetesLauncher(Launcher):
    """``--launcher k8s``: a Kubeflow PyTorchJob, or an indexed Job + headless Service."""

    name = "k8s"
    options = OPTIONS
    shared_filesystem = False
    requests_gpus = True

    def secret_hint(self, name: str) -> str:
        return (f"Store it in a Kubernetes Secret (`kubectl create secret generic NAME --from-literal={name}=...`) "
                f"and name the Secret in launch.k8s.env_from_secrets (all its keys become variables), or map one "
                f"key with launch.k8s.secret_env={{{name}: NAME/KEY}}. docs/launch.md (section Secrets).")

    # -------------------------------------------------------------------- describe
    def check(self, spec: LaunchSpec) -> None:
        job = self.plan(spec)
        for line in job.warnings:
            print(f"warning: {line}", file=sys.stderr)

    def render(self, spec: LaunchSpec) -> str:
        return self.plan(spec).manifest()

    def plan(self, spec: LaunchSpec) -> K8sJob:
        """Check every option (all problems at once) and build the manifest's objects."""
        cfg, opts = spec.config, spec.options
        problems: list[str] = []

        def problem(dotted: str, message: str) -> None:
            source = cfg.source_of(dotted) or _first_source(cfg, dotted)
            problems.append(f"{source}: {message}" if source else message)

        kind = opts["kind"]
        if not opts.get("image"):
            problem("launch.k8s.image", "launch.k8s.image is not set: the pods need a container image with "
                    "automodel-cli, torch (and CUDA for GPUs) installed, e.g. "
                    "launch.k8s.image=ghcr.io/org/trainer:1.0.")
        elif not isinstance(opts["image"], str) or re.search(r"\s", opts["image"]):
            problem("launch.k8s.image", f"launch.k8s.image {opts['image']!r} is not an image reference.")
        if (why := dns_label_problem(opts["namespace"], "launch.k8s.namespace")):
            problem("launch.k8s.namespace", why)

        # the job's name: given, or derived from the local job directory
        suffix = f"-worker-{max(spec.nodes - 2, 0)}" if kind == "pytorchjob" else f"-{spec.nodes - 1}"
        max_len = 63 - len(suffix)
        if spec.job_name:
            name = spec.job_name
            why = dns_label_problem(name, "launch.job_name", max_len=max_len, start_letter=True)
            if why:
                extra = (f" ({max_len}, so that pod and service names such as `NAME{suffix}` fit in 63)"
                         if len(name) > max_len else "")
                problem("launch.job_name", why + extra)
        else:
            name = safe_name(spec.prepare_job_dir().name, max_len)

        # quantities
        for key in ("cpu", "memory", "shm_size"):
            value = opts.get(key)
            if value is None:
                continue
            dotted = f"launch.k8s.{key}"
            if not is_quantity(value):
                problem(dotted, f"{dotted} {value!r} is not a Kubernetes quantity (a number with an optional "
                        f"suffix: Ki, Mi, Gi, Ti, or k, M, G, T; m for milli-CPUs).{_quantity_hint(value)}")
            elif key != "cpu" and re.fullmatch(r"\d+(\.\d*)?", str(value)) and float(value) < 1024 ** 2:
                problem(dotted, f"{dotted} {value!r} means {value} bytes. Did you mean `{value}Gi`?")
        gpu_resource = opts["gpu_resource"]
        if (why := label_key_problem(gpu_resource, "launch.k8s.gpu_resource")):
            problem("launch.k8s.gpu_resource", why)
        if kind == "indexed-job" and opts["restart_policy"] == "ExitCode":
            problem("launch.k8s.restart_policy", "launch.k8s.restart_policy ExitCode needs kind pytorchjob; "
                    "a batch/v1 Job takes OnFailure or Never.")

        # storage
        mount_path = opts["mount_path"]
        if not str(mount_path).startswith("/"):
            problem("launch.k8s.mount_path", f"launch.k8s.mount_path `{mount_path}` must be an absolute path.")
        pvc = opts.get("pvc")
        if pvc is not None and (why := dns_subdomain_problem(pvc, "launch.k8s.pvc")):
            problem("launch.k8s.pvc", why)
        if pvc is None and spec.nodes > 1:
            problem("launch.k8s.pvc", f"a {spec.nodes}-node job needs a shared volume for its checkpoints and "
                    "outputs: set launch.k8s.pvc to a ReadWriteMany PersistentVolumeClaim (every node writes "
                    "its shards of each checkpoint there).")
        output_dir = opts.get("output_dir") or f"{str(mount_path).rstrip('/')}/runs/{name}"
        if not str(output_dir).startswith("/"):
            problem("launch.k8s.output_dir", f"launch.k8s.output_dir `{output_dir}` must be an absolute path "
                    "inside the pods (on the volume at mount_path).")
        extra_pvcs = opts.get("extra_pvcs") or {}
        for claim, path in extra_pvcs.items():
            if (why := dns_subdomain_problem(claim, "launch.k8s.extra_pvcs claim")):
                problem("launch.k8s.extra_pvcs", why)
            if not isinstance(path, str) or not path.startswith("/"):
                problem("launch.k8s.extra_pvcs", f"launch.k8s.extra_pvcs: the mount path of `{claim}` must be "
                        f"an absolute path, got {path!r}.")
        hf_home = opts.get("hf_home")
        if hf_home is None:
            hf_home = f"{str(mount_path).rstrip('/')}/.cache/huggingface" if pvc else ""
        elif hf_home and not hf_home.startswith("/"):
            problem("launch.k8s.hf_home", f"launch.k8s.hf_home `{hf_home}` must be an absolute path.")
        if opts.get("working_dir") is not None and not str(opts["working_dir"]).startswith("/"):
            problem("launch.k8s.working_dir", f"launch.k8s.working_dir `{opts['working_dir']}` must be absolute.")

        # names of other objects
        for key in ("service_account", "priority_class", "scheduler_name"):
            value = opts.get(key)
            if value is not None and (why := dns_subdomain_problem(value, f"launch.k8s.{key}")):
                problem(f"launch.k8s.{key}", why)
        if opts.get("context") is not None and not str(opts["context"]).strip():
            problem("launch.k8s.context", "launch.k8s.context is empty.")
        pull_secrets = _names(opts.get("image_pull_secrets"))
        env_secrets = _names(opts.get("env_from_secrets"))
        for key, names in (("image_pull_secrets", pull_secrets), ("env_from_secrets", env_secrets)):
            for secret in names:
                if (why := dns_subdomain_problem(secret, f"launch.k8s.{key}")):
                    problem(f"launch.k8s.{key}", why)
        secret_env: list[tuple[str, str, str]] = []
        for var, ref in (opts.get("secret_env") or {}).items():
            secret, _, key = str(ref).partition("/")
            key = key or str(var)
            if ENV_NAME.fullmatch(str(var)) is None:
                problem("launch.k8s.secret_env", f"launch.k8s.secret_env: `{var}` is not a variable name.")
            elif (why := dns_subdomain_problem(secret, f"launch.k8s.secret_env.{var}: the secret")):
                problem("launch.k8s.secret_env", why + " Write SECRET-NAME or SECRET-NAME/KEY.")
            elif SECRET_KEY_NAME.fullmatch(key) is None:
                problem("launch.k8s.secret_env", f"launch.k8s.secret_env.{var}: `{key}` is not a secret key.")
            else:
                secret_env.append((str(var), secret, key))

        # labels, annotations, node selector, tolerations
        for key in ("labels", "node_selector"):
            for label, value in (opts.get(key) or {}).items():
                for why in (label_key_problem(label, f"launch.k8s.{key}"),
                            label_value_problem(value, f"launch.k8s.{key}.{label}")):
                    if why:
                        problem(f"launch.k8s.{key}", why)
        for label, value in (opts.get("annotations") or {}).items():
            if (why := label_key_problem(label, "launch.k8s.annotations")):
                problem("launch.k8s.annotations", why.replace("label key", "annotation key"))
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                problem("launch.k8s.annotations", f"launch.k8s.annotations.{label}: the value must be a string.")
        tolerations = []
        for item in opts.get("tolerations") or []:
            toleration, why = parse_toleration(item)
            if why:
                problem("launch.k8s.tolerations", why)
            else:
                tolerations.append(toleration)

        if problems:
            count = len(problems)
            head = ("The k8s launch settings have a problem:" if count == 1 else
                    f"The k8s launch settings have {count} problems:")
            lines = "\n".join(f"  - {line}" for line in problems)
            raise UserError(f"{head}\n{lines}\n", DOCS)

        config_text = spec.frozen_config_text(output_dir=str(output_dir))
        if len(config_text.encode()) > CONFIGMAP_LIMIT - 4096:
            raise UserError(f"The frozen config is {len(config_text.encode())} bytes; a ConfigMap holds at most "
                            "1 MiB.", "Move large inline values (chat templates) into files in the image or on "
                            "the volume.")
        job = K8sJob(name=name, namespace=opts["namespace"], kind=kind, context=opts.get("context"),
                     output_dir=str(output_dir), pvc=pvc, config_text=config_text, objects=[])
        job.warnings = _path_warnings(cfg, mount_path, extra_pvcs)
        if pvc is None:
            job.warnings.append(f"no launch.k8s.pvc: outputs and checkpoints in {output_dir} live in the pod and "
                                "are lost when it ends. Mount a PersistentVolumeClaim with launch.k8s.pvc=NAME.")
        job.objects = self._objects(spec, job, hf_home=hf_home, extra_pvcs=extra_pvcs,
                                    pull_secrets=pull_secrets, env_secrets=env_secrets,
                                    secret_env=secret_env, tolerations=tolerations)
        return job

    # -------------------------------------------------------------------- manifest
    def _objects(self, spec: LaunchSpec, job: K8sJob, *, hf_home: str, extra_pvcs: dict[str, str],
                 pull_secrets: list[str], env_secrets: list[str], secret_env: list[tuple[str, str, str]],
                 tolerations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        opts = spec.options
        labels = {**{str(k): str(v) for k, v in (opts.get("labels") or {}).items()},
                  "app.kubernetes.io/name": "automodel", "app.kubernetes.io/managed-by": "automodel-cli",
                  JOB_LABEL: job.name}
        annotations = {str(k): str(v) for k, v in (opts.get("annotations") or {}).items()}

        def meta(name: str, with_annotations: bool = False) -> dict[str, Any]:
            data: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": dict(labels)}
            if with_annotations and annotations:
                data["annotations"] = dict(annotations)
            return data

        config_map = {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{job.name}-config"),
            "data": {FROZEN_CONFIG: job.config_text},
        }
        if job.kind == "pytorchjob":
            node_rank, rdzv_host = "${RANK}", "${MASTER_ADDR}"
        else:
            node_rank, rdzv_host = "${JOB_COMPLETION_INDEX}", f"{job.name}-0.{job.name}"

        def template(role: str | None) -> dict[str, Any]:
            pod_labels = dict(labels)
            if role:
                pod_labels[ROLE_LABEL] = role
            metadata: dict[str, Any] = {"labels": pod_labels}
            if annotations:
                metadata["annotations"] = dict(annotations)
            return {"metadata": metadata,
                    "spec": self._pod_spec(spec, job, node_rank=node_rank, rdzv_host=rdzv_host, hf_home=hf_home,
                                           extra_pvcs=extra_pvcs, pull_secrets=pull_secrets,
                                           env_secrets=env_secrets, secret_env=secret_env,
                                           tolerations=tolerations)}

        restart = opts["restart_policy"]
        if job.kind == "pytorchjob":
            replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": restart,
                                                   "template": template("master")}}
            if spec.nodes > 1:
                replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": restart,
                                      "template": template("worker")}
            run_policy: dict[str, Any] = {"backoffLimit": opts["backoff_limit"]}
            if opts.get("ttl_seconds_after_finished") is not None:
                run_policy["ttlSecondsAfterFinished"] = opts["ttl_seconds_after_finished"]
            if opts.get("active_deadline_seconds") is not None:
                run_policy["activeDeadlineSeconds"] = opts["active_deadline_seconds"]
            job_object = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                          "metadata": meta(job.name, with_annotations=True),
                          "spec": {"runPolicy": run_policy, "pytorchReplicaSpecs": replicas}}
            return [config_map, job_object]

        service = {
            "apiVersion": "v1", "kind": "Service", "metadata": meta(job.name),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {JOB_LABEL: job.name},
                     "ports": [{"name": "rdzv", "port": spec.rdzv_port, "targetPort": spec.rdzv_port,
                                "protocol": "TCP"}]},
        }
        pod_template = template("node")
        pod_template["spec"]["subdomain"] = job.name
        pod_template["spec"]["restartPolicy"] = restart
        job_spec: dict[str, Any] = {"completionMode": "Indexed", "completions": spec.nodes,
                                    "parallelism": spec.nodes, "backoffLimit": opts["backoff_limit"]}
        if restart == "Never":
            # A preempted or evicted pod is replaced without using up the backoff limit.
            job_spec["podFailurePolicy"] = {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
        if opts.get("ttl_seconds_after_finished") is not None:
            job_spec["ttlSecondsAfterFinished"] = opts["ttl_seconds_after_finished"]
        if opts.get("active_deadline_seconds") is not None:
            job_spec["activeDeadlineSeconds"] = opts["active_deadline_seconds"]
        job_spec["template"] = pod_template
        job_object = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(job.name, with_annotations=True),
                      "spec": job_spec}
        return [config_map, service, job_object]

    def _pod_spec(self, spec: LaunchSpec, job: K8sJob, *, node_rank: str, rdzv_host: str, hf_home: str,
                  extra_pvcs: dict[str, str], pull_secrets: list[str], env_secrets: list[str],
                  secret_env: list[tuple[str, str, str]], tolerations: list[dict[str, Any]]) -> dict[str, Any]:
        opts = spec.options
        env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in spec.env.items()]
        given = set(spec.env) | {var for var, _, _ in secret_env}
        defaults = {"PYTHONUNBUFFERED": "1", "HF_HOME": hf_home}
        env += [{"name": k, "value": v} for k, v in defaults.items() if v and k not in given]
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for var, secret, key in secret_env]

        mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                  {"name": "dshm", "mountPath": "/dev/shm"},
                  {"name": "workspace", "mountPath": opts["mount_path"]}]
        shm: dict[str, Any] = {"medium": "Memory"}
        if opts.get("shm_size") is not None:
            shm["sizeLimit"] = opts["shm_size"]
        volumes: list[dict[str, Any]] = [
            {"name": "config", "configMap": {"name": f"{job.name}-config"}},
            {"name": "dshm", "emptyDir": shm},
            {"name": "workspace", **({"persistentVolumeClaim": {"claimName": job.pvc}} if job.pvc
                                     else {"emptyDir": {}})},
        ]
        for number, (claim, path) in enumerate(extra_pvcs.items()):
            volumes.append({"name": f"extra-{number}", "persistentVolumeClaim": {"claimName": claim}})
            mounts.append({"name": f"extra-{number}", "mountPath": path})

        requests: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        if opts.get("cpu") is not None:
            requests["cpu"] = opts["cpu"]
        if opts.get("memory") is not None:
            requests["memory"] = limits["memory"] = opts["memory"]
        if spec.gpus_per_node > 0:
            limits[opts["gpu_resource"]] = spec.gpus_per_node
        resources = {key: value for key, value in (("requests", requests), ("limits", limits)) if value}

        container: dict[str, Any] = {
            "name": CONTAINER, "image": opts["image"],
            "command": [opts["shell"], "-c", self.script(spec, job, node_rank=node_rank, rdzv_host=rdzv_host)],
        }
        if opts.get("image_pull_policy"):
            container["imagePullPolicy"] = opts["image_pull_policy"]
        if opts.get("working_dir"):
            container["workingDir"] = opts["working_dir"]
        container["env"] = env
        if env_secrets:
            container["envFrom"] = [{"secretRef": {"name": secret}} for secret in env_secrets]
        # The operator reads MASTER_PORT from the port named pytorchjob-port.
        port_name = "pytorchjob-port" if job.kind == "pytorchjob" else "rdzv"
        container["ports"] = [{"name": port_name, "containerPort": spec.rdzv_port, "protocol": "TCP"}]
        if resources:
            container["resources"] = resources
        container["volumeMounts"] = mounts

        pod: dict[str, Any] = {"containers": [container], "volumes": volumes,
                               "terminationGracePeriodSeconds": opts["termination_grace_period_seconds"]}
        if opts.get("service_account"):
            pod["serviceAccountName"] = opts["service_account"]
        if pull_secrets:
            pod["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
        if opts.get("node_selector"):
            pod["nodeSelector"] = {str(k): str(v) for k, v in opts["node_selector"].items()}
        if tolerations:
            pod["tolerations"] = tolerations
        if opts.get("priority_class"):
            pod["priorityClassName"] = opts["priority_class"]
        if opts.get("scheduler_name"):
            pod["schedulerName"] = opts["scheduler_name"]
        return pod

    def script(self, spec: LaunchSpec, job: K8sJob, *, node_rank: str, rdzv_host: str) -> str:
        """The shell script each pod runs: setup lines, then ``exec torchrun`` (signals reach it)."""
        python = str(spec.options["python"])
        command = spec.torchrun_command(python=python, config_path=f"{CONFIG_MOUNT}/{FROZEN_CONFIG}",
                                        rdzv_host=rdzv_host, rdzv_id=job.name,
                                        node_rank="${NODE_RANK}" if spec.nodes > 1 else None)
        lines = ["set -e"]
        lines += spec.setup
        if spec.nodes > 1:
            # Node 0 hosts the rendezvous store: say so instead of letting torchrun guess from DNS,
            # which may not know the pod's name yet when it starts.
            where = "the operator's RANK" if job.kind == "pytorchjob" else "the Job's completion index"
            command.insert(_module_flag(command), "--rdzv-conf=is_host=${RDZV_IS_HOST},read_timeout=600")
            lines += [f"NODE_RANK=\"{node_rank}\"  # node rank: {where}",
                      'if [ "${NODE_RANK}" = 0 ]; then RDZV_IS_HOST=true; else RDZV_IS_HOST=false; fi']
        words = [python] + [_shell_word(arg) for arg in command[1:]]
        lines.append("exec " + " ".join(words))
        return "\n".join(lines) + "\n"

    # -------------------------------------------------------------------- submit
    def launch(self, spec: LaunchSpec) -> int:
        job = self.plan(spec)
        kubectl = require_binary("kubectl", self.name, KUBECTL_HINT)
        spec.prepare_job_dir()
        manifest = spec.launch_dir / MANIFEST
        spec.freeze(output_dir=job.output_dir)
        write_text_atomic(manifest, job.manifest())
        base = kubectl_base(kubectl, job.context)
        hint = (f"The manifest is kept in {manifest}. If kubectl created some objects before the error, remove "
                f"them with `kubectl delete -f {manifest}`.")
        try:
            output = run_tool([*base, "apply", "-f", str(manifest)], "Submitting the job with kubectl apply", hint)
        except UserError as error:
            if 'kind "PyTorchJob"' in error.message:
                hint = ("The cluster has no Kubeflow training operator (the PyTorchJob kind is unknown): install "
                        "it, or use launch.k8s.kind=indexed-job (a plain Job + headless Service). " + hint)
            raise UserError(error.message, hint) from None
        record = JobRecord(
            launcher=self.name, job_id=job.job_id, job_dir=str(spec.job_dir), recipe=spec.recipe,
            job_name=job.name,
            details={"namespace": job.namespace, "kind": job.kind, "name": job.name, "resource": job.resource,
                     "manifest": str(manifest), "context": job.context, "output_dir": job.output_dir,
                     "pvc": job.pvc, "log_selector": job.log_selector, "nodes": spec.nodes,
                     "nproc_per_node": spec.nproc_per_node},
        )
        record.save()
        kube = shlex.join(["kubectl", *(["--context", job.context] if job.context else [])])
        print(output.rstrip("\n"))
        kind = "PyTorchJob" if job.kind == "pytorchjob" else "indexed Job"
        print(f"submitted k8s job {job.job_id} ({spec.describe()}, {kind})")
        print(f"  job directory: {spec.job_dir} (manifest, config and job record in {spec.launch_dir})")
        where = f" on PVC {job.pvc}" if job.pvc else " (pod-local: lost when the pod ends)"
        print(f"  outputs and checkpoints: {job.output_dir}{where}")
        print_follow_commands(job.job_id)
        print("or with kubectl:")
        print(f"  {kube} get {job.resource} {job.name} -n {job.namespace}")
        print(f"  {kube} get pods -n {job.namespace} -l {JOB_LABEL}={job.name}")
        print(f"  {kube} logs -n {job.namespace} -l {job.log_selector} --tail=-1 -f")
        return 0

    # -------------------------------------------------------------------- follow
    def status(self, record: JobRecord) -> str:
        details = record.details
        kubectl = require_binary("kubectl", self.name, KUBECTL_HINT)
        command = [*kubectl_base(kubectl, details.get("context")), "get", details["resource"], details["name"],
                   "-n", details["namespace"], "-o", "json"]
        text = run_tool(command, f"Asking kubectl about {record.job_id}",
                        f"A finished job may have been deleted (ttl_seconds_after_finished) or cancelled; its "
                        f"outputs stay on the volume in {details.get('output_dir')}.")
        try:
            data = json.loads(text)
        except ValueError:
            raise UserError(f"kubectl did not answer with JSON for {record.job_id}: {text[:200]!r}") from None
        return summarize_status(data, details)

    def logs(self, record: JobRecord, follow: bool) -> int:
        details = record.details
        kubectl = require_binary("kubectl", self.name, KUBECTL_HINT)
        command = [*kubectl_base(kubectl, details.get("context")), "logs", "-n", details["namespace"],
                   "-l", details["log_selector"], "-c", CONTAINER, "--tail=-1"]
        if follow:
            command.append("--follow")
        try:
            return subprocess.run(command).returncode
        except OSError as error:
            raise UserError(f"Could not run `{shlex.join(command)}`: {error}.", KUBECTL_HINT) from None
        except KeyboardInterrupt:
            return 130

    def cancel(self, record: JobRecord) -> str:
        details = record.details
        kubectl = require_binary("kubectl", self.name, KUBECTL_HINT)
        base = [*kubectl_base(kubectl, details.get("context"))]
        manifest = Path(details.get("manifest") or "")
        if manifest.is_file():
            command = [*base, "delete", "-f", str(manifest), "--ignore-not-found"]
        else:
            name, namespace = details["name"], details["namespace"]
            objects = [f"{details['resource']}/{name}", f"configmap/{name}-config"]
            if details.get("kind") == "indexed-job":
                objects.append(f"service/{name}")
            command = [*base, "delete", "-n", namespace, *objects, "--ignore-not-found"]
        output = run_tool(command, f"Cancelling {record.job_id} with kubectl delete",
                          "Check the kubectl context and namespace (`kubectl get pods -n NAMESPACE`).")
        volume = f" on PVC {details['pvc']}" if details.get("pvc") else ""
        return (f"{output.rstrip()}\ncancelled {record.job_id}. Outputs and checkpoints in "
                f"{details.get('output_dir')}{volume} are kept; the job's config resumes from the latest "
                f"checkpoint (checkpoint.resume=auto): resubmit with launch.job_name={details['name']} to "
                f"continue it.")


def _module_flag(command: list[str]) -> int:
    """Index of the ``-m`` that starts ``-m automodel_cli`` (torchrun options go before it)."""
    for index in range(len(command) - 1, 0, -1):
        if command[index] == "-m":
            return index
    return len(command)


def parse_toleration(item: Any) -> tuple[dict[str, Any], str | None]:
    """A toleration mapping, or ``key[=value]:Effect`` / ``key[=value]`` shorthand."""
    where = "launch.k8s.tolerations"
    if isinstance(item, str):
        rest, _, effect = item.rpartition(":") if ":" in item else (item, "", "")
        key, _, value = rest.partition("=")
        toleration: dict[str, Any] = {"key": key, "operator": "Equal" if value else "Exists"}
        if value:
            toleration["value"] = value
        if effect:
            toleration["effect"] = effect
        item = toleration
    if not isinstance(item, dict):
        return {}, f"{where}: {item!r} is neither a mapping nor a 'key[=value]:Effect' string."
    unknown = [key for key in item if key not in TOLERATION_KEYS]
    if unknown:
        return {}, (f"{where}: unknown toleration field `{unknown[0]}`."
                    f"{did_you_mean(str(unknown[0]), TOLERATION_KEYS)} Fields: {', '.join(TOLERATION_KEYS)}.")
    operator = item.get("operator", "Equal")
    if operator not in ("Equal", "Exists"):
        return {}, f"{where}: operator must be Equal or Exists, got {operator!r}."
    effect = item.get("effect")
    if effect is not None and effect not in TAINT_EFFECTS:
        return {}, (f"{where}: effect must be one of {', '.join(TAINT_EFFECTS)}, got {effect!r}."
                    f"{did_you_mean(str(effect), TAINT_EFFECTS)}")
    key = item.get("key")
    if key is not None and key != "" and (why := label_key_problem(key, where)):
        return {}, why.replace("label key", "toleration key")
    if operator == "Exists" and item.get("value") not in (None, ""):
        return {}, f"{where}: a toleration with operator Exists takes no value (got {item.get('value')!r})."
    if not key and operator != "Exists":
        return {}, f"{where}: a toleration without a key must use operator Exists."
    seconds = item.get("tolerationSeconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)):
        return {}, f"{where}: tolerationSeconds must be an integer, got {seconds!r}."
    result = {name: item[name] for name in TOLERATION_KEYS if item.get(name) not in (None, "")}
    result.setdefault("operator", operator)
    if "value" in result:
        result["value"] = str(result["value"])
    return result, None


def _path_warnings(cfg: Any, mount_path: str, extra_pvcs: dict[str, str]) -> list[str]:
    """Local paths in the config that the pods will not see (they read the image and the volumes)."""
    mounts = [str(mount_path).rstrip("/") + "/", *(str(p).rstrip("/") + "/" for p in extra_pvcs.values())]
    warnings = []
    for key in ("model.path", "model.tokenizer", "data.path", "data.eval_path", "distill.teacher_path"):
        value = cfg.get(key)
        if not isinstance(value, str) or not value:
            continue
        if any((value.rstrip("/") + "/").startswith(m) for m in mounts):
            continue
        if os.path.isabs(value) or os.path.exists(value):
            warnings.append(f"{key} `{value}` is a path on this machine; the pods read it inside the container "
                            f"(image or mounted volumes: {', '.join(m.rstrip('/') for m in mounts)}).")
    return warnings


def summarize_status(data: dict[str, Any], details: dict[str, Any]) -> str:
    """One screen about a PyTorchJob or Job, from ``kubectl get ... -o json``."""
    status = data.get("status") or {}
    conditions = status.get("conditions") or []
    lines = []
    if details.get("kind") == "pytorchjob":
        true = [c for c in conditions if str(c.get("status")) == "True"]
        state = true[-1]["type"] if true else ("Pending" if not conditions else conditions[-1].get("type", "?"))
        pods = "; ".join(
            f"{role}: " + ", ".join(f"{status_[k]} {k}" for k in ("active", "succeeded", "failed") if status_.get(k))
            for role, status_ in (status.get("replicaStatuses") or {}).items()) or "none yet"
    else:
        true = {c.get("type"): c for c in conditions if str(c.get("status")) == "True"}
        nodes = details.get("nodes") or data.get("spec", {}).get("completions")
        if "Complete" in true:
            state = "Succeeded"
        elif "Failed" in true:
            state = "Failed"
        elif "Suspended" in true:
            state = "Suspended"
        elif status.get("active"):
            state = "Running"
        else:
            state = "Pending"
        counts = [f"{status.get(k, 0)} {k}" for k in ("active", "ready", "succeeded", "failed")]
        pods = ", ".join(counts) + (f" (of {nodes} nodes)" if nodes else "")
    lines.append(f"state: {state}")
    lines.append(f"pods: {pods}")
    if status.get("startTime"):
        lines.append(f"started: {status['startTime']}")
    if status.get("completionTime"):
        lines.append(f"finished: {status['completionTime']}")
    if conditions:
        lines.append("conditions:")
    for condition in conditions:
        reason = f" ({condition['reason']})" if condition.get("reason") else ""
        message = f": {condition['message']}" if condition.get("message") else ""
        when = condition.get("lastTransitionTime") or condition.get("lastUpdateTime") or ""
        lines.append(f"  {condition.get('type')}={condition.get('status')}{reason} {when}{message}".rstrip())
    volume = f" on PVC {details['pvc']}" if details.get("pvc") else ""
    lines.append(f"outputs: {details.get('output_dir')}{volume}")
    return "\n".join(lines)


def options_markdown() -> str:
    """The option table of docs/launch.md's Kubernetes section (a test keeps the two equal)."""
    lines = ["| option (`launch.k8s.`) | default | meaning |", "|---|---|---|"]
    for name, key in OPTIONS.items():
        default = "" if key.default is None else f"`{json.dumps(key.default)}`"
        doc = key.doc.replace("|", "\\|")
        lines.append(f"| `{name}` | {default} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m automodel_cli.components.launch.k8s: the docs table
    print(options_markdown(), end="")
