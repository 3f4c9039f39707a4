"""Tensor parallelism at tp=2 on gloo: an A/M/O/F decoder built from megatron-core layers and loaded
with the shards of a dense model equals that dense model in one process (loss, every gradient), with
tied and untied heads; the mesh agrees with the plan's rank arithmetic."""
import torch

from longtrain.trainer.config import ModelConfig

from parallel_harness import run_ranks

# float64 model; RMSNorm and Mamba's A_log, D, dt_bias go through float32 inside the model, and the
# sharded sums run in another order, so agreement is to float32 rounding, not float64.
TOL = 1e-6


def _config(tie):
    return ModelConfig(pattern="AMOF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, d_state=4,
                       tie_embeddings=tie, ode={"solver": "rk4", "steps": 2})


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _check(rank, world):
    from longtrain.trainer.model.decoder import Decoder, lm_loss
    from longtrain.trainer.parallel.mesh import build_mesh
    from longtrain.trainer.parallel.plan import block_parameters
    from longtrain.trainer.parallel.tensor import (TensorParallelLinears, head_weight, load_dense_shards,
                                                   parallel_linear_loss, shard_dim)

    mesh = build_mesh(tp=world)
    assert mesh.coordinates == {"tp": rank, "cp": 0, "dp": 0, "pp": 0}
    errors = {}
    for tie in (True, False):
        cfg = _config(tie)
        torch.manual_seed(0)
        dense = Decoder(cfg).double()
        sharded = Decoder(cfg, linears=TensorParallelLinears(mesh, torch.float64)).double()
        load_dense_shards(sharded, dense.state_dict(), mesh.coordinates["tp"], mesh.tp)
        counts = block_parameters(cfg, mesh.tp)
        assert [counts[c] for c in cfg.pattern] == [sum(p.numel() for p in b.parameters()) for b in sharded.blocks]
        tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
        targets[0, :3] = -100  # not scored
        loss = lm_loss(dense(tokens), targets)
        loss.backward()
        # the chunked vocab-parallel loss, in chunks of 5 tokens (the last one short) against the dense logits
        parallel_loss = parallel_linear_loss(sharded.hidden(tokens), head_weight(sharded), targets, mesh, chunk=5)
        parallel_loss.backward()
        errors[f"loss tie={tie}"] = _rel(parallel_loss.detach(), loss.detach())
        for (name, p), (_, q) in zip(dense.named_parameters(), sharded.named_parameters()):
            dim = shard_dim(q.shape, p.shape, mesh.tp)
            expected = p.grad if dim is None else p.grad.narrow(dim, rank * q.shape[dim], q.shape[dim])
            errors[f"grad {name} tie={tie}"] = _rel(q.grad, expected)
    mesh.destroy()
    return errors


def test_tensor_parallel_equals_dense():
    for errors in run_ranks(_check, 2):
        for name, error in errors.items():
            assert error < TOL, (name, error)
