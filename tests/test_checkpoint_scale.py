"""Checkpoints at scale (issue 18, item 5): each rank hashes what it writes, picking a checkpoint reads no
weights, and a layout change reads at most 2x a rank's share of the universal section, each block it reads
checked against the manifest's per-block sha256.

The byte counts come from trainer/reshard.py's READ counter (tensor bytes fetched from universal files).
"""
import json
import shutil
import threading

import pytest
import torch

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer import reshard
from longtrain.trainer.errors import LongtrainError

# (dense shape, tp split dim): column-parallel (0), row-parallel (1), replicated (None)
DENSE = {"q.weight": ((512, 64), 0), "o.weight": ((64, 512), 1), "norm.weight": ((64,), None),
         "embed.weight": ((1024, 64), 0)}


def _section(tp: int, tp_rank: int) -> dict:
    """This tp rank's universal section of the DENSE model (deterministic values, 40 Adam steps)."""
    out = {}
    for i, (name, (shape, dim)) in enumerate(DENSE.items()):
        full = {k: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) * (j + 1) + i
                for j, k in enumerate(reshard.KEYS)}
        split = dim if tp > 1 else None
        out[name] = {"dim": split, "index": tp_rank if split is not None else 0, "parts": tp if split is not None else 1,
                     "step": 40, **{k: v if split is None else v.chunk(tp, split)[tp_rank].contiguous()
                                    for k, v in full.items()}}
    return out


def _save(root, tp: int):
    """A checkpoint written by tp ranks: threads joined by save()'s barrier, as processes are by theirs."""
    barrier, errors = threading.Barrier(tp), []

    def rank_saves(rank):
        try:
            ckpt.save(root, 2, {"step": 2, "model": {}, "universal": _section(tp, rank)},
                      {"world_size": tp, "layout": {"tp": tp}}, "name: scale\n", rank=rank, barrier=barrier.wait)
        except Exception as e:  # surfaced below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_saves, args=(rank,)) for rank in range(tp)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return ckpt.step_dir(root, 2)


def _local(name: str, tp: int) -> tuple:
    shape, dim = DENSE[name]
    return tuple(s // tp if d == dim else s for d, s in enumerate(shape))


def _read(path, tp: int, tp_rank: int) -> tuple[dict, int, int]:
    reshard.READ.update(bytes=0, share=0)
    wanted = {name: (_local(name, tp), tp, tp_rank) for name in DENSE}
    slices = reshard.read_slices(path, ckpt.read_manifest(path), wanted)
    return slices, reshard.READ["bytes"], reshard.READ["share"]


@pytest.mark.parametrize("saved_tp,loaded_tp", [(2, 1), (2, 2), (2, 4), (1, 2), (4, 2)])
def test_layout_change_reads_at_most_twice_the_share(tmp_path, saved_tp, loaded_tp):
    path = _save(tmp_path / "checkpoints", saved_tp)
    for tp_rank in range(loaded_tp):
        slices, read, share = _read(path, loaded_tp, tp_rank)
        assert share <= read <= 2 * share, (tp_rank, read, share)
        for name, (shape, dim) in DENSE.items():  # the values the dense model's slice holds
            whole = _section(1, 0)[name]
            for key in reshard.KEYS:
                want = whole[key] if dim is None or loaded_tp == 1 else whole[key].chunk(loaded_tp, dim)[tp_rank]
                assert torch.equal(slices[name][key], want), (name, key)


def test_picking_a_checkpoint_reads_no_weights_and_reads_check_their_blocks(tmp_path):
    path = _save(tmp_path / "checkpoints", 2)
    manifest = ckpt.read_manifest(path)
    assert sorted(manifest["files"]) == ["common.pt", "rank00000.pt", "rank00001.pt", "recipe.yaml",
                                         "universal00000.safetensors", "universal00001.safetensors"]
    assert not list(path.glob("rank*.json"))  # the ranks' sidecars were merged into the manifest
    # damage rank 1's file, which a tp=1 reader reads and tp rank 0 of a tp=2 reader does not
    file = path / "universal00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # last stored tensor's last byte
    file.write_bytes(bytes(data))
    assert ckpt.latest(tmp_path / "checkpoints") == path  # sizes only: no weights read to pick it
    with pytest.raises(LongtrainError, match=r"universal00001.safetensors fails its sha256 check"):
        ckpt.verify(path)
    with pytest.raises(LongtrainError, match=r"universal00001.safetensors fails its sha256 check \(.*rows from"):
        _read(path, 1, 0)
    _read(path, 2, 0)  # tp rank 0 of a tp=2 load reads none of rank 1's file: its check passes


def test_a_rank_file_is_checked_by_its_reader_in_full(tmp_path):
    path = _save(tmp_path / "checkpoints", 2)
    file = path / "rank00001.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    assert ckpt.load_rank_state(path, 0)["step"] == 2
    with pytest.raises(LongtrainError, match="rank00001.pt fails its sha256 check"):
        ckpt.load_rank_state(path, 1)
    assert ckpt.load_common(path)["step"] == 2


def test_manifest_with_a_missing_slice_is_refused(tmp_path):
    path = _save(tmp_path / "checkpoints", 2)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["universal00001.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "universal00001.safetensors").unlink()
    with pytest.raises(LongtrainError, match=r"lists slices \[0\] of \w+\.weight, which has 2"):
        _read(path, 1, 0)


# ---- end to end: a tp=2 run resumed in one process ----

def _resume_bytes(rank, world, run_dir, parallel, train, resume):
    from test_reshard import _train

    reshard.READ.update(bytes=0, share=0)
    _train(rank, world, run_dir, parallel, train, resume)
    return dict(reshard.READ)


def test_tp2_run_resumed_in_one_process_reads_its_share(tmp_path):
    from parallel_harness import run_ranks
    from test_reshard import ONE, SAVED, TP2

    (parallel_a, train_a, world_a), (parallel_b, train_b, world_b) = TP2, ONE
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    run_ranks(_resume_bytes, world_a, args=(straight, parallel_a, train_a, None), deepspeed=True)
    (switched / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / f"step_{SAVED:08d}", switched / "checkpoints" / f"step_{SAVED:08d}")
    [read] = run_ranks(_resume_bytes, world_b, args=(switched, parallel_b, train_b, "auto"), deepspeed=True)
    assert 0 < read["share"] <= read["bytes"] <= 2 * read["share"], read
