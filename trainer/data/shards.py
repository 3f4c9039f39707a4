"""Memory-mapped token shards with document boundaries: their layout, fingerprint and reader.
The writer is trainer/data/prepare.py (`longtrain data prepare`, or `train` when the shards are missing).

Layout of a data directory:
    tokenizer.model          the sentencepiece model
    train.bin, eval.bin      token ids (uint16 when the vocabulary fits, else uint32), documents
                             joined with EOS
    train.docs.npy, ...      int64 start offset of every document in the .bin
    meta.json                written last: dtype, token counts, the data settings and the fingerprint of the inputs
The held-out split is the tail of the token stream after a seeded shuffle of documents (work units,
then documents within each), so a corpus of one large file splits too. Under a run directory that holds checkpoints the shards are never
rewritten: the checkpoints were trained on them.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from longtrain.trainer.data.tokenizer import Tokenizer
from longtrain.trainer.errors import LongtrainError


def settings(cfg) -> dict:
    """The data settings that decide the token stream (seq_len and packing only cut it into sequences)."""
    return cfg.model_dump(mode="json", exclude={"seq_len", "packing"})


def fingerprint(cfg, files) -> str:
    """Hash of what decides the token stream: file names, sizes and mtimes, and the data settings."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    h.update(json.dumps(settings(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _has_checkpoints(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir())


def _keep_for_run(meta: dict, cfg, data_dir: Path) -> TokenShards:
    """Shards whose fingerprint no longer matches, under a run with checkpoints: never rewritten, since the
    checkpoints were trained on these tokens (and their tokenizer). Changed settings are refused, naming
    the field; a corpus whose files changed (sizes, mtimes) with the same settings keeps the prepared tokens."""
    run_dir = data_dir.parent
    fix = "to resume, or start a new run (another run.dir, or --overwrite)"
    saved = meta.get("settings")
    if saved is None:  # prepared before meta.json recorded its settings
        raise LongtrainError(f"{data_dir} was prepared with other data settings or corpus files than data.* gives "
                             f"now, and the checkpoints in {run_dir / 'checkpoints'} were trained on it: restore "
                             f"the old data settings {fix}")
    old, new = _flat(saved), _flat(settings(cfg))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            raise LongtrainError(f"data.{key}={new.get(key)!r} differs from the data.{key}={old.get(key)!r} that "
                                 f"prepared {data_dir}, which the checkpoints in {run_dir / 'checkpoints'} were "
                                 f"trained on: set data.{key}={old.get(key)!r} {fix}")
    warnings.warn(f"the corpus files changed since {data_dir} was prepared; this run continues on the tokens "
                  "its checkpoints were trained on", RuntimeWarning, stacklevel=3)
    return TokenShards(data_dir)


TOKENIZER_PATH_FIX = "set data.tokenizer.path to a .model file written by SentencePiece, or remove it to train one"


def read_meta(path: Path) -> dict:
    """meta.json of a data directory; a damaged one is a LongtrainError naming it."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LongtrainError(f"{path} is damaged ({' '.join(str(e).split())[:160]}): delete {path.parent} to "
                             "prepare the data again") from None
    if not isinstance(meta, dict):
        raise LongtrainError(f"{path} is damaged (not a JSON object): delete {path.parent} to prepare the data again")
    return meta


class TokenShards:
    """Read-only view of a prepared data directory. A damaged file in it is a LongtrainError naming the file."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        fix = f"delete {self.dir} to prepare the data again"
        self.meta = read_meta(self.dir / "meta.json")
        self.tokenizer = Tokenizer(self.dir / "tokenizer.model", fix=fix)
        self.splits, self.doc_starts = {}, {}
        name = "meta.json"
        try:
            dtype = np.dtype(self.meta["dtype"])
            for split in ("train", "eval"):
                name = f"{split}.bin"
                self.splits[split] = np.memmap(self.dir / name, dtype=dtype, mode="r")
                name = f"{split}.docs.npy"
                # allow_pickle=False: an object array (pickled Python objects) is refused, never executed
                starts = np.load(self.dir / name, allow_pickle=False)
                if starts.ndim != 1 or starts.dtype.kind not in "iu":
                    raise ValueError(f"{starts.dtype} array of shape {starts.shape}, not int64 offsets")
                self.doc_starts[split] = starts
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise LongtrainError(f"{self.dir / name} is damaged ({reason}): {fix}") from None


def prepare(cfg, data_dir: Path, seed: int = 0) -> TokenShards:
    """Build (or reuse, when the fingerprint matches) the shards for a DataConfig. Returns the view.
    What `train` runs when the shards are missing: `longtrain data prepare` with one worker."""
    from longtrain.trainer.data.prepare import prepare_data  # it builds on this module's readers

    return prepare_data(cfg, data_dir, seed=seed).shards
