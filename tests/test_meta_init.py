"""Meta-device construction: a rank materialises only its part of the model, and every part equals its
slice of the one-process model (trainer/model/init.py).

The oracle is the one-process model (`build_decoder`) and slicing its tensors; the memory rule is checked
by what each rank allocates while building: the bytes of its own parameters, not the dense model's.
"""
import math

import pytest
import torch

from longtrain.trainer.config import ModelConfig, ParallelConfig, TrainConfig
from longtrain.trainer.model import init as model_init

from parallel_harness import run_ranks


def _small():
    return ModelConfig(pattern="AMOF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=4,
                       ode={"solver": "rk4", "steps": 1})


def _large():  # about 37M parameters: 140 MiB of float32, so what a rank allocates is far above the noise
    return ModelConfig(pattern="AMFMAF", d_model=768, n_heads=8, n_kv_heads=4, vocab_size=16384, d_state=8)


@pytest.mark.parametrize("rule", [("normal", 0.02), ("uniform", -0.5, 0.5), ("dt_bias", 1e-3, 1e-1), ("a_log",),
                                  ("const", 1.0)])
@pytest.mark.parametrize("shape", [(37, 11), (300, 7, 3), (1000,)])
def test_every_slice_equals_the_slice_of_the_whole(monkeypatch, rule, shape):
    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 64)  # many blocks, slices that cross their edges
    whole = model_init.dense_slice(rule, "w", 7, shape)
    assert whole.shape == shape
    for dim in range(len(shape)):
        for parts in (2, 3, 5):
            if shape[dim] % parts:
                continue
            size = shape[dim] // parts
            for index in range(parts):
                piece = model_init.dense_slice(rule, "w", 7, shape, dim, index * size, (index + 1) * size)
                assert torch.equal(piece, whole.narrow(dim, index * size, size)), (rule, shape, dim, index)
    other = model_init.dense_slice(rule, "v", 7, shape)
    if rule[0] not in ("const", "a_log"):  # keyed by name: another tensor draws other values
        assert not torch.equal(whole, other)


def test_one_process_model_is_drawn_by_name_and_seed():
    a = model_init.build_decoder(_small(), seed=3)
    b = model_init.build_decoder(_small(), seed=3)
    c = model_init.build_decoder(_small(), seed=4)
    for (name, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), name
        if p.init_rule[0] not in ("const", "a_log"):
            assert not torch.equal(p, r), name
    # the rules give the distributions the eager constructors give
    assert abs(a.embed.weight.std().item() - _small().init_std) < 0.003
    mamba = a.blocks[1].mixer
    assert torch.equal(mamba.A_log[0], torch.log(torch.arange(1, 5, dtype=torch.float32)))
    delta = torch.nn.functional.softplus(mamba.dt_bias)
    assert 1e-3 <= delta.min() and delta.max() <= 1e-1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _build_part(rank, world, tp, zero, large):
    import ctypes

    from longtrain.trainer.parallel.mesh import build_mesh
    from longtrain.trainer.parallel.parallelize import parallelize, zero_partition

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: freed tensors leave the RSS at once
    cfg = _large() if large else _small()
    mesh = build_mesh(tp=tp, pp=1, cp=1)
    parallel = ParallelConfig(tp=tp, zero_stage=zero)
    train = TrainConfig(micro_batch_size=1, grad_accum=1)
    before = _rss()
    module = parallelize(cfg, mesh, 16, seed=5, partition=zero_partition(train, parallel, mesh))
    grown = _rss() - before
    if zero == 3:
        held = sum(p.ds_tensor.numel() for p in module.parameters()) * 4
        values = {}
    else:
        held = sum(p.numel() for p in module.parameters()) * 4
        values = {n: p.detach().clone() for n, p in module.decoder.named_parameters()} if not large else {}
    mesh.destroy()
    return {"grown": grown, "held": held, "values": values, "tp_rank": mesh.coordinates["tp"]}


def test_tensor_parallel_shards_equal_slices_of_one_process():
    from longtrain.trainer.parallel.tensor import shard_dim

    dense = dict(model_init.build_decoder(_small(), seed=5).named_parameters())
    for result in run_ranks(_build_part, 2, args=(2, 0, False), deepspeed=True):
        assert set(result["values"]) == set(dense)
        for name, tensor in result["values"].items():
            dim = shard_dim(tensor.shape, dense[name].shape, 2)
            want = dense[name] if dim is None else dense[name].narrow(dim, result["tp_rank"] * tensor.shape[dim],
                                                                      tensor.shape[dim])
            assert torch.equal(tensor, want), name


@pytest.mark.parametrize("tp, zero", [(2, 0), (1, 3)], ids=["tp2", "dp2-zero3"])
def test_a_rank_allocates_its_part_only(tp, zero):
    """Building the model under tp=2, or ZeRO-3 over 2 ranks, allocates about half the dense model per rank
    (the old construction built the whole dense model on every rank first: 1.0x or more)."""
    dense_bytes = sum(math.prod(s) for s in model_init.dense_shapes(_large()).values()) * 4
    for result in run_ranks(_build_part, 2, args=(tp, zero, True), deepspeed=True):
        assert result["held"] <= 0.55 * dense_bytes, (result["held"], dense_bytes)
        assert result["grown"] <= 0.7 * dense_bytes, (result["grown"] / dense_bytes, result)


def _zero3_engine(rank, world):
    from longtrain.trainer.engine import build_engine, deepspeed_config
    from longtrain.trainer.parallel.parallelize import ZeroPartition

    train, parallel = TrainConfig(micro_batch_size=1, grad_accum=1, lr=1e-2), ParallelConfig(zero_stage=3)
    module = model_init.build_decoder(_small(), seed=5, partition=ZeroPartition(None, deepspeed_config(train, parallel, world)))
    engine, optimizer, _ = build_engine(module, train, parallel, dp_size=world)
    shared = [master.untyped_storage().data_ptr() == low.untyped_storage().data_ptr()
              for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat)]
    before = [low.clone() for low in optimizer.fp16_partitioned_groups_flat]
    tokens = torch.randint(0, _small().vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank))
    loss = torch.nn.functional.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    moved = [float((low - old).abs().max()) for low, old in zip(optimizer.fp16_partitioned_groups_flat, before)]
    return {"shared": shared, "moved": moved}


def test_zero3_steps_its_partition_without_a_second_float32_copy():
    """Under ZeRO-3 in float32 the optimizer's master weights are the module's partition (one copy, not two:
    trainer/engine.py share_float32_master), and Adam's update lands in the partition the forward gathers."""
    for result in run_ranks(_zero3_engine, 2, deepspeed=True):
        assert result["shared"] and all(result["shared"]), result
        assert all(m > 0 for m in result["moved"]), result
