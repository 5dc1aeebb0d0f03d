"""automodel-cli: fine-tune, pre-train and distil Hugging Face models from one command.

This module is imported by every plugin, so it stays tiny: the hookimpl marker, the version
and the names of the public API. Nothing here imports torch.
"""

import pluggy

__version__ = "0.1.0"

#: Project name shared by the entry-point group, the pluggy marker and the hook prefix.
PROJECT_NAME = "automodel"

#: Decorate plugin functions with ``@hookimpl`` to implement a hook.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["__version__", "hookimpl", "PROJECT_NAME"]
