"""`longtrain ckpt`: inspect a checkpoint, verify its checksums, convert it to one safetensors file.

    longtrain ckpt inspect PATH          step, samples, layout, files, parameter count
    longtrain ckpt verify PATH           exit 0 when every file matches the manifest, else names the file
    longtrain ckpt convert PATH OUT      consolidated model weights as safetensors (for inference)
PATH is a checkpoint directory, or a run directory or its checkpoints/ directory (the newest complete
checkpoint). OUT must lie outside every checkpoint directory.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _resolve(path: str) -> Path:
    from longtrain.trainer import checkpoint as ckpt

    return ckpt.locate(path)


def _inside_checkpoints(target: Path) -> Path | None:
    """The checkpoint directory (step_*, a temporary one, or a run's checkpoints/ root) that target lies in."""
    from longtrain.trainer.checkpoint import STEP_DIR, step_dirs

    for parent in target.parents:
        if STEP_DIR.match(parent.name) or parent.name.startswith(".tmp_step_") or (parent / "manifest.json").exists():
            return parent
        if parent.name == "checkpoints" and step_dirs(parent):
            return parent
    return None


def _check_output(out: Path, checkpoint: Path) -> None:
    """Before any weights are read: refuse an output inside a checkpoint (it would replace or add a file the
    manifest covers, or the very file being read) and an output directory that cannot be written."""
    from longtrain.trainer.errors import LongtrainError

    target, source = out.resolve(), checkpoint.resolve()
    if target == source:
        raise LongtrainError(f"convert output {out} is the checkpoint it reads: give a file outside it, e.g. "
                             f"{source.parent.parent / (source.name + '.safetensors')}")
    inside = source if source in target.parents else _inside_checkpoints(target)
    if inside is not None:
        suggestion = source.parent.parent / f"{source.name}.safetensors" if source.parent.name == "checkpoints" \
            else Path(out.name)
        raise LongtrainError(f"convert output {out} is inside checkpoint directory {inside}, which it must not alter: "
                             f"write it elsewhere, e.g. {suggestion}")
    if target.is_dir():
        raise LongtrainError(f"convert output {out} is a directory: give a file name, e.g. {out / 'model.safetensors'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise LongtrainError(f"convert output {out}: cannot write in {target.parent} ({e.strerror or e}): "
                             "choose a writable directory") from None


def cmd_inspect(args) -> int:
    from longtrain.trainer import checkpoint as ckpt
    from longtrain.trainer.reshard import consolidated_weights

    path = _resolve(args.path)
    manifest = ckpt.verify(path)
    weights = consolidated_weights(path, manifest)
    summary = {
        "path": str(path), "step": manifest["step"], "consumed_samples": manifest.get("consumed_samples"),
        "world_size": manifest.get("world_size"), "layout": manifest.get("layout"),
        "parameters": sum(t.numel() for t in weights.values()),
        "files": {name: info["bytes"] for name, info in manifest["files"].items()},
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_verify(args) -> int:
    from longtrain.trainer import checkpoint as ckpt

    path = _resolve(args.path)
    manifest = ckpt.verify(path)
    print(f"ok: {path} (step {manifest['step']}, {len(manifest['files'])} files match manifest.json)")
    return 0


def cmd_convert(args) -> int:
    from safetensors.torch import save_file

    from longtrain.trainer import checkpoint as ckpt
    from longtrain.trainer.reshard import consolidated_weights

    from longtrain.trainer.errors import LongtrainError

    path = _resolve(args.path)
    out = Path(args.out)
    _check_output(out, path)
    manifest = ckpt.verify(path)
    state = consolidated_weights(path, manifest)
    tmp = out.with_name(out.name + ".tmp")
    try:
        # Tied embeddings share storage; safetensors refuses shared tensors, so each is written once as its own copy.
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"step": str(manifest["step"]), "recipe": (path / "recipe.yaml").read_text()})
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LongtrainError(f"convert output {out}: {e.strerror or e}; nothing was written") from None
    print(f"wrote {out} ({len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters, "
          f"step {manifest['step']}, from {manifest.get('world_size', 1)} rank file(s))")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="inspect, verify or convert a checkpoint")
    actions = p.add_subparsers(dest="action", required=True)
    for name, func, help_text in (("inspect", cmd_inspect, "print the manifest summary"),
                                  ("verify", cmd_verify, "check every file against the manifest's sha256")):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("path")
        a.set_defaults(func=func)
    a = actions.add_parser("convert", help="write the model weights as one safetensors file")
    a.add_argument("path")
    a.add_argument("out")
    a.set_defaults(func=cmd_convert)
