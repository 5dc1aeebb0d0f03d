"""Built-in launchers: where a recipe's processes run."""

from __future__ import annotations

from automodel_cli import hookimpl


@hookimpl
def register_launchers(registry):
    registry.add("local", "automodel_cli.components.launch.local:LocalLauncher",
                 description="This machine: one process, or torchrun with --nproc-per-node N.")
    registry.add("slurm", "automodel_cli.components.launch.slurm:SlurmLauncher",
                 description="A Slurm batch job: srun starts torchrun on every node; requeues on preemption.")
    registry.add("k8s", "automodel_cli.components.launch.k8s:KubernetesLauncher",
                 description="A Kubernetes PyTorchJob (or indexed Job + headless Service), applied with kubectl.")
