"""What a checkpoint holds, from its metadata alone (``automodel checkpoint inspect``).

Reads ``meta.json``, ``train_state.json`` and the DCP indexes of ``model/`` and ``optim/``;
never the tensor data, so it is instant even for a large model. ``verify=True`` also checks
every file's size and sha256 against ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automodel_cli.components.checkpoint import dcp_io, layout


def describe(source: str | Path, *, verify: bool = False) -> dict[str, Any]:
    from automodel_cli.components.checkpoint.consolidate import resolve_checkpoint
    from automodel_cli.components.checkpoint.load import read_meta, read_train_state, verify_files

    path = resolve_checkpoint(source)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta, digests=True)
    model_index = dcp_io.read_metadata(path / layout.MODEL_DIR)
    tensors = dcp_io.tensor_infos(model_index)
    out: dict[str, Any] = {
        "checkpoint": str(path),
        "step": meta.get("step"),
        "created": meta.get("created"),
        "torch_version": meta.get("torch_version"),
        "format_version": meta.get("format_version"),
        "model_class": meta.get("model_class"),
        "hf_architecture": meta.get("hf_architecture"),
        "world_size": meta.get("world_size"),
        "mesh": meta.get("mesh"),
        "peft": meta.get("peft"),
        "trainable_only": meta.get("trainable_only"),
        "tied": meta.get("tied") or {},
        "train_state": read_train_state(path),
        "tensors": [
            {"name": info.name, "dtype": str(info.dtype).removeprefix("torch."), "shape": list(info.shape),
             "numel": info.numel, "bytes": info.nbytes, "shards": info.chunks}
            for info in sorted(tensors.values(), key=lambda i: i.name)
        ],
        "parameters": sum(info.numel for info in tensors.values()),
        "model_bytes": sum(info.nbytes for info in tensors.values()),
    }
    optim_dir = path / layout.OPTIMIZER_DIR
    if (optim_dir / dcp_io.METADATA_FILE).is_file():
        optim = dcp_io.tensor_infos(dcp_io.read_metadata(optim_dir))
        out["optimizer"] = {"tensors": len(optim), "bytes": sum(i.nbytes for i in optim.values())}
    else:
        out["optimizer"] = None
    files = meta.get("files", {})
    out["files"] = len(files)
    out["size_on_disk"] = sum(int(f.get("size", 0)) for f in files.values())
    out["hf_files"] = sorted(n.removeprefix(f"{layout.HF_DIR}/") for n in files if n.startswith(f"{layout.HF_DIR}/"))
    out["verified"] = verify
    return out


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def render(info: dict[str, Any]) -> str:
    """The human-readable report."""
    mesh = info.get("mesh")
    mesh_text = "not sharded (no DTensor)" if not mesh else (
        f"{'x'.join(map(str, mesh['shape']))} ({', '.join(mesh.get('dim_names') or []) or 'unnamed'}), "
        f"placements {', '.join(mesh.get('placements') or [])}")
    peft = info.get("peft")
    lines = [
        f"checkpoint   {info['checkpoint']}",
        f"step         {info['step']}",
        f"saved        {info['created']} by torch {info['torch_version']} (format {info['format_version']})",
        f"model        {info['hf_architecture'] or info['model_class']}"
        + (f", {peft['peft_type']} adapter `{peft['adapter_name']}` on {peft['base_model_name_or_path']}"
           if peft else ""),
        f"world size   {info['world_size']}",
        f"mesh         {mesh_text}",
        f"train state  " + ", ".join(f"{k}={v}" for k, v in sorted(info["train_state"].items())),
        f"parameters   {info['parameters']:,} in {len(info['tensors'])} tensors, {human_size(info['model_bytes'])}"
        + (" (trainable subset)" if info.get("trainable_only") else ""),
    ]
    if info.get("optimizer"):
        lines.append(f"optimizer    {info['optimizer']['tensors']} tensors, {human_size(info['optimizer']['bytes'])}")
    if info.get("tied"):
        lines.append("tied         " + ", ".join(f"{a} -> {b}" for a, b in sorted(info["tied"].items())))
    lines.append(f"on disk      {info['files']} files, {human_size(info['size_on_disk'])}"
                 + (" (sizes and sha256 verified)" if info.get("verified") else ""))
    lines.append(f"hf files     {', '.join(info['hf_files']) or 'none'}")
    lines.append("")
    rows = [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", human_size(t["bytes"]),
             str(t["shards"])) for t in info["tensors"]]
    header = ("tensor", "dtype", "shape", "size", "shards")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines.append(f"total: {len(rows)} tensors, {info['parameters']:,} parameters, {human_size(info['model_bytes'])}")
    return "\n".join(lines) + "\n"
