"""The tensor-parallel loss never holds the logits: at vocab 32k, seq 4096 and tp=2 its extra memory per
rank is at most 1/8 of the full float32 logits (measured as the rise of each process's peak resident
set, bench/loss_memory.py), where the logits path it replaced takes half of them (each rank's shard)."""
import importlib.util
from pathlib import Path

import pytest

from parallel_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 32000, 4096


def _measure(rank, world):
    spec = importlib.util.spec_from_file_location("loss_memory", ROOT / "bench" / "loss_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.measure(rank, VOCAB, SEQ_LEN, 64, world)


@pytest.mark.slow
@pytest.mark.distributed
def test_loss_extra_memory_is_an_eighth_of_the_logits_at_most():
    full_logits = SEQ_LEN * VOCAB * 4
    for rank, paths in enumerate(run_ranks(_measure, 2)):
        ours, logits_path = paths["ours (chunked, vocab-parallel)"][0], paths["logits + megatron vocab_parallel_cross_entropy"][0]
        assert ours <= full_logits / 8, (rank, ours / full_logits)
        assert logits_path >= full_logits / 2 * 0.9, (rank, logits_path / full_logits)  # the measurement sees the shard
