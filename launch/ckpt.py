"""`longtrain ckpt`: inspect a checkpoint, verify its checksums, convert it to one safetensors file.

    longtrain ckpt inspect PATH          step, samples, layout, files, parameter count
    longtrain ckpt verify PATH           exit 0 when every file matches the manifest, else names the file
    longtrain ckpt convert PATH OUT      consolidated model weights as safetensors (for inference)
PATH is a checkpoint directory, or a run's checkpoints/ directory (its newest complete checkpoint).
"""
from __future__ import annotations

import json
from pathlib import Path


def _resolve(path: str) -> Path:
    from longtrain.trainer import checkpoint as ckpt
    from longtrain.trainer.errors import LongtrainError

    p = Path(path)
    if not p.exists():
        raise LongtrainError(f"checkpoint path {path!r} does not exist")
    if (p / "manifest.json").exists() or not p.is_dir():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir() and any(child.name.startswith("step_") for child in root.iterdir()):
            found = ckpt.latest(root)
            if found is None:
                raise LongtrainError(f"{path}: no complete checkpoint")
            return found
    raise LongtrainError(f"{path} is not a checkpoint (no manifest.json)")


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

    path = _resolve(args.path)
    manifest = ckpt.verify(path)
    state = consolidated_weights(path, manifest)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # Tied embeddings share storage; safetensors refuses shared tensors, so each is written once as its own copy.
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp),
              metadata={"step": str(manifest["step"]), "recipe": (path / "recipe.yaml").read_text()})
    tmp.replace(out)
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
