"""The default launcher: run on this machine.

One process runs the recipe right here. ``--nproc-per-node N`` (``--gpus-per-node N``) starts N
processes through torchrun, forwarding Ctrl-C/SIGTERM so every rank checkpoints and stops.
Several nodes need a scheduler to start the other machines, so ``--nodes > 1`` is refused with
the launchers that can do it.
"""

from __future__ import annotations

from automodel_cli.components.launch.base import Launcher, LaunchSpec
from automodel_cli.errors import UserError


class LocalLauncher(Launcher):
    name = "local"
    #: launch.env is for cluster jobs: the processes started here inherit this shell's
    #: environment, where a reference such as ${HF_TOKEN} names the same variable.
    shell_env = True

    def secret_hint(self, name: str) -> str:
        return (f"Export {name} in this shell instead (`export {name}=...`, or from a file: "
                f"`export {name}=$(cat ~/.secrets/{name.lower()})`): the processes started here inherit "
                "its environment. docs/launch.md (section Secrets).")

    def uses_frozen_config(self, spec: LaunchSpec) -> bool:
        """Only torchrun's processes read the frozen config; one process runs the recipe here,
        which checks its own settings as it starts."""
        return spec.nproc_per_node > 1

    def check(self, spec: LaunchSpec) -> None:
        if spec.nodes > 1:
            raise UserError(
                f"The local launcher runs on this machine only, so --nodes {spec.nodes} cannot be "
                "honoured.",
                "Use a cluster launcher: --launcher slurm (submits an sbatch job) or --launcher k8s "
                "(renders a Kubernetes PyTorchJob); or drop --nodes to run on this machine.",
            )

    def launch(self, spec: LaunchSpec) -> int:
        if spec.nproc_per_node <= 1:
            return spec.run_here()
        from automodel_cli.components.launch.torchrun import run_torchrun

        spec.prepare_job_dir()
        return run_torchrun(spec)
