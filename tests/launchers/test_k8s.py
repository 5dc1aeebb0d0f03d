"""The Kubernetes launcher: manifests checked against the Kubernetes API schema, offline.

ConfigMap, Service and batch/v1 Job are validated with the JSON schemas that kubernetes-validate
bundles (strict: unknown fields fail). PyTorchJob is a CRD, not part of that schema: each
replica's pod template is validated against the core PodTemplateSpec schema and the job's own
fields against a small schema of the Kubeflow v1 API written here.

No cluster can run on the test machine (no container runtime, no network), so submission goes
to a stand-in ``kubectl`` placed first on PATH: it records its arguments and the manifest it was
given and answers the way kubectl does. The real kubectl, if installed, is never called.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml as pyyaml  # YAML 1.1, like kubectl's reader
from kubernetes_validate import utils as kv
from referencing import Registry, Resource
from ruamel.yaml import YAML

from automodel_cli.components.launch.k8s import OPTIONS, options_markdown, safe_name
from conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "automodel_cli" / "assets" / "demo"
MARKER = "# ---- k8s: what would be submitted (nothing was) ----\n"
#: The oldest Kubernetes still commonly run, and the newest schema the package bundles.
K8S_VERSIONS = ("1.30", kv.latest_version())
IMAGE = "ghcr.io/example/trainer:1.0"
FULL = [  # the options a real multi-node GPU job uses
    f"launch.k8s.image={IMAGE}", "launch.k8s.pvc=shared-ckpt", "launch.k8s.namespace=ml-team",
    "launch.k8s.memory=200Gi", "launch.k8s.cpu=32", "launch.k8s.shm_size=64Gi",
    "launch.k8s.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
    "launch.k8s.tolerations=[nvidia.com/gpu:NoSchedule,"
    " {key: dedicated, operator: Equal, value: ml, effect: NoExecute}]",
    "launch.k8s.env_from_secrets=[hf-token]", "launch.k8s.secret_env={WANDB_API_KEY: wandb/api-key}",
    "launch.k8s.image_pull_secrets=[regcred]", "launch.k8s.labels={team: ml, kueue.x-k8s.io/queue-name: gpus}",
    "launch.k8s.annotations={example.com/owner: alice}", "launch.k8s.service_account=trainer",
    "launch.k8s.priority_class=high", "launch.k8s.extra_pvcs={datasets: /data}",
    "launch.k8s.ttl_seconds_after_finished=86400",
    "launch.env.NCCL_DEBUG=WARN", "launch.env.TOKENIZERS_PARALLELISM=false",
    "launch.setup=[source /opt/venv/bin/activate, nvidia-smi]",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Run in a temp dir (default job dirs are relative) with a private job index."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


FAKE_KUBECTL = r'''#!{python}
"""Stand-in kubectl: records argv (and any -f manifest), answers like kubectl."""
import json, os, sys
args = sys.argv[1:]
entry = {"argv": args}
if "-f" in args:
    entry["manifest"] = open(args[args.index("-f") + 1]).read()
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\n")
if os.environ.get("FAKE_KUBECTL_FAIL"):
    sys.stderr.write(os.environ["FAKE_KUBECTL_FAIL"] + "\n")
    sys.exit(1)
if args[:1] == ["--context"]:
    args = args[2:]
verb = args[0]
if verb in ("apply", "delete") and "-f" in args:
    from ruamel.yaml import YAML
    for doc in YAML(typ="safe").load_all(entry["manifest"]):
        group = doc["apiVersion"].rpartition("/")[0]
        kind = doc["kind"].lower() + ("." + group if group else "")
        if verb == "apply":
            print(f"{kind}/{doc['metadata']['name']} created")
        else:
            print(f'{kind} "{doc["metadata"]["name"]}" deleted')
elif verb == "delete":
    for obj in args[1:]:
        if "/" in obj:
            print(f'{obj.split("/")[0]} "{obj.split("/")[1]}" deleted')
elif verb == "get":
    print(os.environ.get("FAKE_KUBECTL_STATUS", "{}"))
elif verb == "logs":
    print("[rank0]: step 1 loss 2.5")
'''


@pytest.fixture
def kubectl(tmp_path, monkeypatch):
    """A stand-in kubectl first on PATH; returns a function reading the calls it received."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "kubectl"
    script.write_text(FAKE_KUBECTL.replace("{python}", sys.executable))
    script.chmod(0o755)
    log = tmp_path / "kubectl-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log))

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def finetune(cli, *args: str):
    return cli("finetune", "demo", "--launcher", "k8s", *args)


def manifest_of(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    assert MARKER in result.stdout, result.stdout
    return list(YAML(typ="safe").load_all(result.stdout.split(MARKER, 1)[1]))


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


def pod_specs(objects: list[dict]) -> list[dict]:
    kinds = by_kind(objects)
    if "PyTorchJob" in kinds:
        return [r["template"] for r in kinds["PyTorchJob"]["spec"]["pytorchReplicaSpecs"].values()]
    return [kinds["Job"]["spec"]["template"]]


def torchrun_args(template: dict) -> tuple[list[str], list[str]]:
    """The container's script lines, and the torchrun command's arguments (after the python)."""
    command = template["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/bash", "-c"]
    lines = command[2].splitlines()
    exec_line = lines[-1]
    assert exec_line.startswith("exec ")
    return lines, shlex.split(exec_line)[2:]  # after `exec PYTHON`


# ------------------------------------------------------------------------ schema checks
def _schema_dir(version: str) -> Path:
    full = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)][-1]
    return Path(str(resources.files("kubernetes_validate"))) / "kubernetes-json-schema" / f"v{full}-local-strict"


@lru_cache(maxsize=None)
def _registry(version: str) -> Registry:
    definitions = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@lru_cache(maxsize=None)
def pod_template_validator(version: str) -> jsonschema.Draft202012Validator:
    """The core PodTemplateSpec schema (a sub-definition, with its references resolved)."""
    schema = json.loads((_schema_dir(version) / "podtemplatespec-v1.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


REPLICA = {
    "type": "object", "required": ["replicas", "template"], "additionalProperties": False,
    "properties": {"replicas": {"type": "integer", "minimum": 0},
                   "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                   "template": {"type": "object"}},
}
#: The fields of a Kubeflow training-operator v1 PyTorchJob this launcher may write.
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                             "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
            "properties": {
                "pytorchReplicaSpecs": {
                    "type": "object", "required": ["Master"], "additionalProperties": False,
                    "properties": {"Master": {"allOf": [REPLICA, {"properties": {"replicas": {"const": 1}}}]},
                                   "Worker": {"allOf": [REPLICA, {"properties": {"replicas": {"minimum": 1}}}]}},
                },
                "runPolicy": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"backoffLimit": {"type": "integer", "minimum": 0},
                                   "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                                   "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                                   "cleanPodPolicy": {"enum": ["None", "Running", "All"]},
                                   "suspend": {"type": "boolean"},
                                   "schedulingPolicy": {"type": "object"}},
                },
                "elasticPolicy": {"type": "object"},
                "nprocPerNode": {"type": "string"},
            },
        },
    },
}


def validate(obj: dict, version: str) -> None:
    """Raise jsonschema.ValidationError unless ``obj`` is valid for Kubernetes ``version``."""
    if obj.get("kind") == "PyTorchJob":
        jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA, registry=_registry(version)).validate(obj)
        for replica in obj["spec"]["pytorchReplicaSpecs"].values():
            pod_template_validator(version).validate(replica["template"])
    else:
        kv.validate(obj, version, strict=True)


def validate_all(objects: list[dict]) -> None:
    for version in K8S_VERSIONS:
        for obj in objects:
            validate(obj, version)


# ------------------------------------------------------------------------------ render
@pytest.mark.parametrize("nodes", [1, 4])
def test_pytorchjob_manifest_is_schema_valid(cli, nodes):
    objects = manifest_of(finetune(cli, "--nodes", str(nodes), "--gpus-per-node", "8", "--dry-run",
                                   f"distributed.dp_shard={nodes * 8}", *FULL))
    assert [obj["kind"] for obj in objects] == ["ConfigMap", "PyTorchJob"]
    validate_all(objects)
    job = by_kind(objects)["PyTorchJob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert ("Worker" in replicas) == (nodes > 1)
    if nodes > 1:
        assert replicas["Worker"]["replicas"] == nodes - 1
    assert job["metadata"]["namespace"] == "ml-team"
    assert job["spec"]["runPolicy"] == {"backoffLimit": 3, "ttlSecondsAfterFinished": 86400}
    for template in pod_specs(objects):
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == IMAGE
        assert container["resources"] == {"requests": {"cpu": 32, "memory": "200Gi"},
                                          "limits": {"memory": "200Gi", "nvidia.com/gpu": 8}}
        # The operator takes MASTER_PORT from the port called pytorchjob-port.
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500, "protocol": "TCP"}]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"config": "/etc/automodel", "dshm": "/dev/shm", "workspace": "/workspace",
                          "extra-0": "/data"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "shared-ckpt"}
        assert volumes["extra-0"]["persistentVolumeClaim"] == {"claimName": "datasets"}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert volumes["config"]["configMap"]["name"] == objects[0]["metadata"]["name"]
        env = {e["name"]: e for e in container["env"]}
        assert env["NCCL_DEBUG"]["value"] == "WARN" and env["PYTHONUNBUFFERED"]["value"] == "1"
        assert env["HF_HOME"]["value"] == "/workspace/.cache/huggingface"
        assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
        assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["serviceAccountName"] == "trainer" and pod["priorityClassName"] == "high"
        assert pod["terminationGracePeriodSeconds"] == 300
        assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
        assert template["metadata"]["annotations"] == {"example.com/owner": "alice"}


@pytest.mark.parametrize("nodes", [1, 4])
def test_indexed_job_manifest_is_schema_valid(cli, nodes):
    objects = manifest_of(finetune(cli, "--nodes", str(nodes), "--gpus-per-node", "8", "--dry-run",
                                   f"distributed.dp_shard={nodes * 8}", "launch.k8s.kind=indexed-job",
                                   "launch.k8s.restart_policy=Never", "launch.k8s.active_deadline_seconds=3600",
                                   *FULL))
    assert [obj["kind"] for obj in objects] == ["ConfigMap", "Service", "Job"]
    validate_all(objects)
    service, job = by_kind(objects)["Service"], by_kind(objects)["Job"]
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", nodes, nodes)
    assert spec["activeDeadlineSeconds"] == 3600 and spec["backoffLimit"] == 3
    # Never: a pod evicted by preemption is replaced without using up the backoff limit.
    assert spec["podFailurePolicy"]["rules"][0] == {"action": "Ignore",
                                                    "onPodConditions": [{"type": "DisruptionTarget",
                                                                                         "status": "True"}]}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # Pods get hostname NAME-INDEX; with subdomain = the headless Service they resolve as
    # NAME-INDEX.SERVICE, and the Service must select them even before they are ready.
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = spec["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["port"] == 29500


def test_torchrun_arguments_pytorchjob(cli):
    objects = manifest_of(finetune(cli, "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
                                   "distributed.dp_shard=32", "launch.rdzv_port=29400", *FULL))
    name = objects[1]["metadata"]["name"]
    for template in pod_specs(objects):
        lines, args = torchrun_args(template)
        assert lines[:3] == ["set -e", "source /opt/venv/bin/activate", "nvidia-smi"]
        assert 'NODE_RANK="${RANK}"' in "\n".join(lines)  # the operator's RANK is the node rank
        assert args[:2] == ["-m", "torch.distributed.run"]
        assert "--nproc-per-node=8" in args and "--nnodes=4" in args
        assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=${MASTER_ADDR}:29400" in args
        assert f"--rdzv-id={name}" in args and "--node-rank=${NODE_RANK}" in args
        assert args[-4:] == ["-m", "automodel_cli", "finetune", "/etc/automodel/config.yaml"]
        container = template["spec"]["containers"][0]
        assert container["ports"][0]["containerPort"] == 29400


def test_torchrun_arguments_single_node_is_standalone(cli):
    objects = manifest_of(finetune(cli, "--gpus-per-node", "2", "--dry-run", f"launch.k8s.image={IMAGE}",
                                   "distributed.dp_shard=2"))
    (template,) = pod_specs(objects)
    _, args = torchrun_args(template)
    assert "--standalone" in args and "--nproc-per-node=2" in args
    assert not any(a.startswith(("--nnodes", "--rdzv-endpoint", "--node-rank")) for a in args)


@pytest.mark.parametrize("kind,env,node_rank", [
    ("indexed-job", {"JOB_COMPLETION_INDEX": "0"}, "0"),
    ("indexed-job", {"JOB_COMPLETION_INDEX": "3"}, "3"),
    ("pytorchjob", {"RANK": "2", "MASTER_ADDR": "job-master-0"}, "2"),
])
def test_pod_script_expands_node_rank_in_a_shell(cli, kind, env, node_rank):
    """Run the pod's script in bash with `echo` as the python: torchrun gets the expanded args."""
    objects = manifest_of(finetune(cli, "--nodes", "4", "--dry-run", f"launch.k8s.image={IMAGE}",
                                   "launch.k8s.pvc=ckpt", f"launch.k8s.kind={kind}", "launch.k8s.python=echo",
                                   "distributed.dp_shard=4"))
    template = pod_specs(objects)[-1]
    name = objects[-1]["metadata"]["name"]
    script = template["spec"]["containers"][0]["command"][2]
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env}, check=True)
    args = done.stdout.split()
    host = "job-master-0" if kind == "pytorchjob" else f"{name}-0.{name}"
    assert f"--rdzv-endpoint={host}:29500" in args
    assert f"--node-rank={node_rank}" in args
    is_host = "true" if node_rank == "0" else "false"
    assert f"--rdzv-conf=is_host={is_host},read_timeout=600" in args


def test_config_map_holds_a_valid_config_for_the_pods(cli, workdir):
    objects = manifest_of(finetune(cli, "--nodes", "2", "--dry-run", "distributed.dp_shard=2", *FULL,
                                   "launch.job_name=llama-sft", "checkpoint.every_steps=50"))
    config_map = by_kind(objects)["ConfigMap"]
    assert config_map["metadata"]["name"] == "llama-sft-config"
    text = config_map["data"]["config.yaml"]
    path = workdir / "pod-config.yaml"
    path.write_text(text)
    result = cli("config", "validate", str(path))
    assert result.exit_code == 0, result.stderr
    frozen = YAML(typ="safe").load(text)
    assert frozen["output_dir"] == "/workspace/runs/llama-sft"  # on the shared volume
    assert frozen["checkpoint"]["resume"] == "auto"  # a restarted pod continues
    assert frozen["checkpoint"]["every_steps"] == 50 and frozen["recipe"] == "finetune"
    # an explicit in-pod output directory
    objects = manifest_of(finetune(cli, "--dry-run", f"launch.k8s.image={IMAGE}", "launch.k8s.pvc=ckpt",
                                   "launch.k8s.output_dir=/workspace/exp/one"))
    assert YAML(typ="safe").load(objects[0]["data"]["config.yaml"])["output_dir"] == "/workspace/exp/one"


def test_secrets_come_from_kubernetes_secrets_never_from_the_config(cli, workdir):
    token = "hf_SuperSecretValue1234567890abcdefgh"
    # Secrets named by the options: the manifest refers to them and holds no value.
    objects = manifest_of(finetune(cli, "--dry-run", f"launch.k8s.image={IMAGE}", "launch.k8s.env_from_secrets=hf-token",
                                   "launch.k8s.secret_env={WANDB_API_KEY: wandb/api-key}"))
    env = {e["name"]: e for e in pod_specs(objects)[0]["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    # A literal, anywhere in the config, or a credential-named launch.env variable even as a reference
    # (a manifest is no shell): refused with the Secret advice, the value never shown.
    for setting in (f"data.options.api_key={token}", f"launch.env.HF_TOKEN={token}", "launch.env.HF_TOKEN=${HF_TOKEN}"):
        result = finetune(cli, "--dry-run", "-o", "runs/secret", f"launch.k8s.image={IMAGE}", setting)
        assert result.exit_code == 2, setting
        assert f"`{setting.split('=')[0]}`" in result.stderr and "holds a credential" in result.stderr
        assert "launch.k8s.env_from_secrets" in result.stderr and "launch.k8s.secret_env" in result.stderr
        assert token not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()


def test_dry_run_writes_nothing(cli, workdir, kubectl):
    before = sorted(p.name for p in workdir.iterdir())
    result = finetune(cli, "--dry-run", "-o", "runs/exp", *FULL)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == before
    assert kubectl() == []
    manifest_of(result)


def test_yaml_strings_stay_strings_for_kubectl(cli):
    """kubectl reads YAML 1.1, where yes/on/1.10 are not strings: such values must be quoted."""
    result = finetune(cli, "--dry-run", f"launch.k8s.image={IMAGE}", "launch.k8s.labels={spot: 'yes'}",
                      "launch.env.FLAG=on", "launch.env.VERSION='1.10'", "launch.env.TIME='1:30'")
    for obj in pyyaml.safe_load_all(result.stdout.split(MARKER, 1)[1]):
        if obj["kind"] == "PyTorchJob":
            template = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
            env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
            assert env["FLAG"] == "on" and env["VERSION"] == "1.10" and env["TIME"] == "1:30"
            assert template["metadata"]["labels"]["spot"] == "yes"


def test_job_names_derived_from_the_job_directory_are_dns_safe(cli):
    objects = manifest_of(finetune(cli, "--dry-run", f"launch.k8s.image={IMAGE}", "-o", "runs/My_Run.v2"))
    assert objects[1]["metadata"]["name"] == "my-run-v2"
    assert safe_name("2024 run") == "am-2024-run"
    long = "finetune-" + "x" * 80 + "-20250101-120000"
    name = safe_name(long, 50)
    assert len(name) <= 50 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert name.endswith("120000") and safe_name(long.replace("20250101", "20250102"), 50) != name


# ------------------------------------------------------------------ the validator itself
def test_validator_catches_broken_manifests(cli):
    objects = manifest_of(finetune(cli, "--nodes", "2", "--dry-run", "distributed.dp_shard=2", *FULL))
    indexed = manifest_of(finetune(cli, "--nodes", "2", "--dry-run", "distributed.dp_shard=2", *FULL,
                                   "launch.k8s.kind=indexed-job"))
    validate_all(objects + indexed)  # the real ones pass

    def broken(obj: dict, change) -> dict:
        copy = json.loads(json.dumps(obj))
        change(copy)
        return copy

    job, service, config_map = by_kind(indexed)["Job"], by_kind(indexed)["Service"], by_kind(indexed)["ConfigMap"]
    pytorchjob = by_kind(objects)["PyTorchJob"]
    container = lambda o: o["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    master = lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]  # noqa: E731
    bad = [
        broken(job, lambda o: container(o).update(resource={})),  # misspelt field
        broken(job, lambda o: o["spec"].update(completions="four")),  # wrong type
        broken(job, lambda o: o["spec"]["template"]["spec"].pop("containers")),  # required field
        broken(job, lambda o: container(o).update(env=[{"value": "x"}])),  # env var without a name
        broken(service, lambda o: o["spec"]["ports"][0].update(port="rdzv")),
        broken(config_map, lambda o: o.update(data=["config.yaml"])),
        broken(pytorchjob, lambda o: o.update(apiVersion="kubeflow.org/v2")),
        broken(pytorchjob, lambda o: master(o).update(replicas=2)),
        broken(pytorchjob, lambda o: master(o).pop("template")),
        broken(pytorchjob, lambda o: o["spec"].update(pytorchReplicaSpec={})),
        broken(pytorchjob, lambda o: master(o)["template"]["spec"].update(nodeselector={})),
        broken(pytorchjob, lambda o: master(o)["template"]["spec"]["volumes"][0].update(configMap="x")),
    ]
    for obj in bad:
        with pytest.raises(jsonschema.ValidationError):
            validate(obj, K8S_VERSIONS[-1])


# ------------------------------------------------------------------------------ submit
RUNNING = {"status": {"conditions": [
    {"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "lastTransitionTime": "2025-01-01T10:00:00Z"},
    {"type": "Running", "status": "True", "reason": "PyTorchJobRunning", "message": "job is running",
     "lastTransitionTime": "2025-01-01T10:01:00Z"}],
    "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}}, "startTime": "2025-01-01T10:00:00Z"}}
COMPLETE = {"spec": {"completions": 2}, "status": {
    "succeeded": 2, "startTime": "2025-01-01T10:00:00Z", "completionTime": "2025-01-01T11:00:00Z",
    "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2025-01-01T11:00:00Z"}]}}


def test_submit_status_logs_cancel_with_kubectl(cli, workdir, kubectl, monkeypatch):
    result = finetune(cli, "--nodes", "2", "distributed.dp_shard=2", "-o", "runs/exp1", *FULL,
                      "launch.k8s.context=gpu-cluster")
    assert result.exit_code == 0, result.stderr
    job_dir = workdir / "runs" / "exp1"
    manifest = job_dir / "launch" / "manifest.yaml"
    record = json.loads((job_dir / "launch" / "job.json").read_text())
    assert record["launcher"] == "k8s" and record["job_id"] == "ml-team/exp1"
    assert record["details"]["kind"] == "pytorchjob" and record["details"]["manifest"] == str(manifest)
    assert (job_dir / "launch" / "config.yaml").read_text() == by_kind(
        list(YAML(typ="safe").load_all(manifest.read_text())))["ConfigMap"]["data"]["config.yaml"]
    (apply,) = kubectl()
    assert apply["argv"] == ["--context", "gpu-cluster", "apply", "-f", str(manifest)]
    assert apply["manifest"] == manifest.read_text()
    validate_all(list(YAML(typ="safe").load_all(apply["manifest"])))
    assert "pytorchjob.kubeflow.org/exp1 created" in result.stdout
    assert "automodel launch logs ml-team/exp1 --follow" in result.stdout
    assert ("kubectl --context gpu-cluster logs -n ml-team -l automodel-cli/job=exp1,automodel-cli/role=master"
            in result.stdout)
    assert not any(p.name in ("metrics.jsonl", "checkpoints", "final") for p in job_dir.iterdir())

    monkeypatch.setenv("FAKE_KUBECTL_STATUS", json.dumps(RUNNING))
    status = cli("launch", "status", "ml-team/exp1")
    assert status.exit_code == 0, status.stderr
    assert kubectl()[-1]["argv"] == ["--context", "gpu-cluster", "get", "pytorchjob.kubeflow.org", "exp1",
                                     "-n", "ml-team", "-o", "json"]
    assert "state: Running" in status.stdout and "Master: 1 active; Worker: 1 active" in status.stdout
    assert "/workspace/runs/exp1 on PVC shared-ckpt" in status.stdout
    assert cli("launch", "status", "k8s:ml-team/exp1").exit_code == 0  # LAUNCHER:ID works too

    logs = run_cli("launch", "logs", str(job_dir), "--follow")  # kubectl writes to the terminal
    assert logs.exit_code == 0, logs.stderr
    assert "[rank0]: step 1 loss 2.5" in logs.stdout
    assert kubectl()[-1]["argv"] == ["--context", "gpu-cluster", "logs", "-n", "ml-team", "-l",
                                     "automodel-cli/job=exp1,automodel-cli/role=master", "-c", "pytorch",
                                     "--tail=-1", "--follow"]

    cancel = cli("launch", "cancel", "ml-team/exp1")
    assert cancel.exit_code == 0, cancel.stderr
    assert kubectl()[-1]["argv"] == ["--context", "gpu-cluster", "delete", "-f", str(manifest), "--ignore-not-found"]
    assert 'pytorchjob.kubeflow.org "exp1" deleted' in cancel.stdout
    assert "are kept" in cancel.stdout and "launch.job_name=exp1" in cancel.stdout


def test_indexed_job_status_and_cancel_without_manifest(cli, workdir, kubectl, monkeypatch):
    result = finetune(cli, "--nodes", "2", "distributed.dp_shard=2", "-o", "runs/exp2", f"launch.k8s.image={IMAGE}",
                      "launch.k8s.pvc=ckpt", "launch.k8s.kind=indexed-job")
    assert result.exit_code == 0, result.stderr
    assert "job.batch/exp2 created" in result.stdout and "service/exp2 created" in result.stdout
    monkeypatch.setenv("FAKE_KUBECTL_STATUS", json.dumps(COMPLETE))
    status = cli("launch", "status", "runs/exp2")
    assert kubectl()[-1]["argv"] == ["get", "job.batch", "exp2", "-n", "default", "-o", "json"]
    assert "state: Succeeded" in status.stdout and "2 succeeded" in status.stdout
    (workdir / "runs" / "exp2" / "launch" / "manifest.yaml").unlink()
    cancel = cli("launch", "cancel", "default/exp2")
    assert cancel.exit_code == 0, cancel.stderr
    assert kubectl()[-1]["argv"] == ["delete", "-n", "default", "job.batch/exp2", "configmap/exp2-config",
                                     "service/exp2", "--ignore-not-found"]


def test_rejected_submission_shows_kubectl_message(cli, workdir, kubectl, monkeypatch):
    message = 'Error from server (NotFound): error when creating "manifest.yaml": namespaces "ml-team" not found'
    monkeypatch.setenv("FAKE_KUBECTL_FAIL", message)
    result = finetune(cli, "-o", "runs/exp3", *FULL)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "kubectl delete -f" in result.stderr  # how to clean up what kubectl may have created
    assert not (workdir / "runs" / "exp3" / "launch" / "job.json").exists()
    assert not (workdir / "state").exists()


def test_missing_kubectl(cli, workdir, monkeypatch):
    empty = workdir / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = finetune(cli, "-o", "runs/exp4", *FULL)
    assert result.exit_code == 2
    assert "needs `kubectl`, which is not on PATH" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()


# ---------------------------------------------------------------- automodel launch FILE
def test_launch_file_runs_on_k8s_or_locally_by_changing_only_launch(cli, workdir):
    body = (f"recipe: finetune\nmodel:\n  path: {DEMO}\n  from_scratch: true\ndata:\n  name: demo\n"
            "  max_length: 32\ntrain:\n  max_steps: 2\n  global_batch_size: 4\n  micro_batch_size: 2\n")
    k8s = workdir / "k8s.yaml"
    k8s.write_text(body + "launch:\n  launcher: k8s\n  nodes: 2\n  gpus_per_node: 1\n  job_name: demo-sft\n"
                   f"  k8s:\n    image: {IMAGE}\n    pvc: ckpt\n    kind: indexed-job\n")
    objects = manifest_of(cli("launch", str(k8s), "--dry-run"))
    validate_all(objects)
    assert by_kind(objects)["Job"]["metadata"]["name"] == "demo-sft"
    _, args = torchrun_args(pod_specs(objects)[0])
    assert "--nnodes=2" in args and "--nproc-per-node=1" in args
    local = workdir / "local.yaml"
    local.write_text(body + "launch:\n  launcher: local\n")
    result = cli("launch", str(local), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert MARKER not in result.stdout and "launcher local" in result.stdout
    assert not (workdir / "runs").exists()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    ([], "launch.k8s.image is not set"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.memory=64GB"], "Did you mean `64Gi`?"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.memory=64"], "means 64 bytes"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.cpu=lots"], "is not a Kubernetes quantity"),
    ([f"launch.k8s.image={IMAGE}", "launch.job_name=My_Job"], "is not a valid DNS-1123 name"),
    ([f"launch.k8s.image={IMAGE}", "launch.job_name=" + "a" * 60], "at most 54 are allowed"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.namespace=Team_A"], "launch.k8s.namespace `Team_A`"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.imagee=x"], "Did you mean `launch.k8s.image`?"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.kind=pytorch-job"], "Did you mean `pytorchjob`?"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.tolerations=[gpu:NoSchedul]"], "Did you mean `NoSchedule`?"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.pvc=Shared_Ckpt"], "launch.k8s.pvc `Shared_Ckpt`"),
    ([f"launch.k8s.image={IMAGE}", "--nodes", "2", "distributed.dp_shard=2"], "needs a shared volume"),
    ([f"launch.k8s.image={IMAGE}", "launch.k8s.kind=indexed-job", "launch.k8s.restart_policy=ExitCode"],
     "ExitCode needs kind pytorchjob"),
])
def test_bad_input_exits_2_and_writes_nothing(cli, workdir, kubectl, args, message):
    result = finetune(cli, "-o", "runs/bad", *args)
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists() and not (workdir / "state").exists()
    assert kubectl() == []


def test_every_problem_is_reported_at_once(cli):
    result = finetune(cli, "--dry-run", "launch.k8s.memory=64GB", "launch.k8s.namespace=Team_A",
                      "launch.k8s.labels={bad key: x}")
    assert result.exit_code == 2
    assert "have 4 problems" in result.stderr
    for text in ("launch.k8s.image is not set", "64GB", "Team_A", "bad key"):
        assert text in result.stderr
    # each problem names where it was set
    assert "command line `launch.k8s.memory=64GB`" in result.stderr


def test_docs_describe_every_option():
    """docs/launch.md carries the option table as generated from the launcher's own table."""
    text = (REPO / "docs" / "launch.md").read_text()
    section = text.split("<!-- k8s", 1)[1]
    assert all(f"| `{name}` |" in section for name in OPTIONS)
    assert options_markdown() in section, (
        "regenerate the table with: python -m automodel_cli.components.launch.k8s")


def test_docs_launch_file_example_renders_a_valid_manifest(cli, workdir):
    section = (REPO / "docs" / "launch.md").read_text().split("<!-- k8s", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = workdir / "job.yaml"
    path.write_text(example)
    objects = manifest_of(cli("launch", str(path), "--dry-run"))
    validate_all(objects)
    assert by_kind(objects)["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
