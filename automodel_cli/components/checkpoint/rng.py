"""Capture and restore random-number-generator states, in a form ``weights_only`` can load.

Exact resume needs every RNG that influences training (dropout uses torch's global generator,
data order often a dedicated ``torch.Generator``, user code may use ``random`` or numpy) to
continue from where the saved run stopped. Everything is stored as tensors, ints, floats,
strings, tuples, lists and dicts, because ``torch.load(weights_only=True)`` refuses anything
else (numpy arrays in particular), and that refusal is what keeps loading safe.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from automodel_cli.errors import UserError

log = logging.getLogger(__name__)


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot the global RNGs plus any named generators the recipe owns."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    numpy_state = _numpy_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this rank's device: get_rng_state_all() would create a CUDA context on every
        # visible GPU from every rank.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None,
                      *, source: str = "checkpoint", restore_globals: bool = True) -> None:
    """Put every captured RNG back; generators named by the caller must be in ``state``.

    ``restore_globals=False`` restores only the named generators.
    """
    if restore_globals:
        _restore_globals(state, source)
    saved_generators = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved_generators:
            raise UserError(
                f"{source} has no state for the random generator `{name}` "
                f"(it has: {', '.join(sorted(saved_generators)) or 'none'}).",
                "It was probably saved by a different recipe; start fresh with checkpoint.resume=off.",
            )
        generator.set_state(saved_generators[name])


def _restore_globals(state: dict[str, Any], source: str) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if torch.cuda.is_available() and "cuda" in state:
        saved = state["cuda"]
        if isinstance(saved, torch.Tensor):  # this rank's current device
            torch.cuda.set_rng_state(saved)
            return
        count = torch.cuda.device_count()  # older files: one state per visible device
        if len(saved) != count:
            log.warning("%s saved %d CUDA RNG states but %d devices are visible; restoring the "
                        "first %d", source, len(saved), count, min(len(saved), count))
        for device, rng in enumerate(saved[:count]):
            torch.cuda.set_rng_state(rng, device)


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "algorithm": str(algorithm),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:  # saved where numpy was installed, resumed where it is not
        return
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["algorithm"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))
