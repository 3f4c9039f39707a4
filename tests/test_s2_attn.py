"""model.s2_attn: LongLoRA's shifted sparse attention (Chen et al. 2023, arXiv 2309.12307) in training.

Oracles, in float64: LongLoRA's own construction (roll the shifted heads by -G/2, cut G-token groups, causal
attention per group, roll back), with the wrapped-around last group split in two, as the no-wrap semantics
says; and, with packed documents or a sequence that is not a whole number of groups, explicit per-head
boolean masks (same document, same group, causal). Each path of the layer (groups cut out and attended as
short sequences; group starts passed to the op as document starts) meets one of them, in every backend.
"""
import math

import pytest
import torch

from conftest import assert_recipe_refused
from longtrain.kernels.rotary import apply_rotary
from longtrain.trainer.config import ModelConfig
from longtrain.trainer.metrics import flops_per_token
from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears, rotary_tables
from longtrain.trainer.parallel.plan import attention_span

SEQ, GROUP, D_MODEL, HEADS, KV_HEADS = 32, 8, 32, 8, 4


def _attention(group=GROUP, backend="reference", n_kv_heads=KV_HEADS, seed=0):
    s2 = None if group is None else {"group": group}
    cfg = ModelConfig(pattern="A", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=n_kv_heads, s2_attn=s2)
    torch.manual_seed(seed)
    return Attention(cfg, Linears(cfg.init_std), backend)


def _shifted_heads(heads, kv_heads):
    """The query heads whose groups shift: those of the odd kv heads."""
    return (torch.arange(heads) // (heads // kv_heads)) % 2 == 1


def _softmax_attention(q, k, v, keep):
    """q, k, v: (batch, seq, heads, dim); keep: bool broadcastable to (batch, heads, seq_q, seq_k)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def longlora_attention(q, k, v, group):
    """LongLoRA's S²-Attn (its shift(): roll, reshape into groups, attend, roll back), on the heads of the
    odd kv heads, with the last rolled group (the sequence's last G/2 tokens, then its first G/2) cut in two."""
    batch, seq, heads, dim = q.shape
    shifted = _shifted_heads(heads, k.shape[2])
    k, v = (x.repeat_interleave(heads // k.shape[2], dim=2) for x in (k, v))
    out = torch.empty_like(q)
    n, half = seq // group, group // 2
    for select, shift in ((~shifted, 0), (shifted, half)):
        parts = [x[:, :, select].roll(-shift, dims=1).reshape(batch * n, group, -1, dim) for x in (q, k, v)]
        keep = torch.ones(group, group, dtype=torch.bool).tril().expand(batch, n, group, group).clone()
        if shift:
            side = torch.arange(group) >= group - half  # wrapped-around tokens: the sequence's first G/2
            keep[:, -1] &= side[:, None] == side[None, :]
        grouped = _softmax_attention(*parts, keep.reshape(batch * n, 1, group, group))
        out[:, :, select] = grouped.reshape(batch, seq, -1, dim).roll(shift, dims=1)
    return out


def masked_attention(q, k, v, group, doc):
    """Explicit masks: a query at i sees a key at j <= i of its own document and of its own group, the groups
    of the shifted heads starting at G/2 + m*G. doc: (batch, seq) document start of every token."""
    batch, seq, heads, _ = q.shape
    shifted_heads = _shifted_heads(heads, k.shape[2])
    k, v = (x.repeat_interleave(heads // k.shape[2], dim=2) for x in (k, v))
    position = torch.arange(seq)
    plain_group, shifted_group = position // group, (position + group // 2) // group
    keep = torch.empty(batch, heads, seq, seq, dtype=torch.bool)
    for h, shifted in enumerate(shifted_heads.tolist()):
        g = shifted_group if shifted else plain_group
        keep[:, h] = ((g[:, None] == g[None, :]) & (position[:, None] >= position[None, :])
                      & (doc[:, :, None] == doc[:, None, :]))
    return _softmax_attention(q, k, v, keep)


def oracle(module, x, positions=None, doc=None):
    """The layer with `attend` replaced by an oracle; the projections and rotary positions as in the layer."""
    batch, seq, _ = x.shape
    q = module.q(x).view(batch, seq, module.heads, module.head_dim)
    k = module.k(x).view(batch, seq, module.kv_heads, module.head_dim)
    v = module.v(x).view(batch, seq, module.kv_heads, module.head_dim)
    cos, sin = rotary_tables(seq, module.head_dim, module.theta, module.scaling, positions=positions,
                             context_len=seq)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = longlora_attention(q, k, v, module.s2_group) if doc is None else masked_attention(q, k, v, module.s2_group, doc)
    return module.out(out.reshape(batch, seq, -1))


def test_training_output_and_gradients_equal_longlora_in_float64():
    module = _attention().double().train()
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64, requires_grad=True)
    out, gold = module(x), oracle(module, x)
    assert (out - gold).abs().max() < 1e-12
    weights = [x, *module.parameters()]
    grads, gold_grads = (torch.autograd.grad((y * torch.cos(y)).sum(), weights) for y in (module(x), oracle(module, x)))
    for g, gold_g in zip(grads, gold_grads):
        assert g.abs().sum() > 0 and (g - gold_g).abs().max() < 1e-12
    full = _attention(None).double()  # the same weights (same seed), full causal attention
    assert (full(x) - out).abs().max() > 1e-3  # groups change the output: the comparison above can fail


def _packed(batch, seq, starts):
    """(positions, doc): in-document positions and document starts for documents starting at `starts`."""
    doc = torch.zeros(batch, seq, dtype=torch.int64)
    for b, row in enumerate(starts):
        for s in row:
            doc[b, s:] = s
    return torch.arange(seq)[None] - doc, doc


CASES = {  # seq, document starts per row (None: no documents)
    "packed documents": (SEQ, [[0, 5, 13], [0, 20]]),  # group starts go to the op as document starts
    "groups cut out": (SEQ, None),  # the groups attended as a batch of short sequences
    "one group": (GROUP, None),  # no shifted group between the two ends
    "seq not a multiple of G": (SEQ - GROUP // 2, None),  # document starts again, no documents
}


@pytest.mark.parametrize("backend", ["reference", "csrc", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_every_path_equals_the_oracle(backend, case):
    seq, starts = CASES[case]
    positions, doc = _packed(2, seq, starts or [[0], [0]])
    if starts is None:
        positions = None
    gold_module = _attention().double().train()
    x = torch.randn(2, seq, D_MODEL, dtype=torch.float64)
    gold = oracle(gold_module, x, positions, doc if starts or seq % GROUP else None)
    if backend == "reference":
        assert (gold_module(x, positions=positions) - gold).abs().max() < 1e-12
        return
    # float32 backends: within twice the float32 reference's error (flash-attn's rule)
    base = _attention().train()(x.float(), positions=positions).double()
    fast = _attention(backend=backend).train()(x.float(), positions=positions).double()
    assert (fast - gold).abs().max() <= 2 * (base - gold).abs().max() + 1e-6


class _TwoShards(Linears):
    """This rank's half of each column / row layer, as tensor parallelism at tp=2 hands them out."""
    tp = 2

    def column(self, in_features, out_features, bias=False):
        return self._linear(in_features, out_features // 2, bias)

    def row(self, in_features, out_features, bias=False):
        return self._linear(in_features // 2, out_features, bias)


def test_the_shifted_heads_are_the_same_under_tensor_parallelism():
    """Two tp shards with their slices of the weights sum to the one-process layer: the shifted heads are the
    same global heads whatever parallel.tp (the odd kv heads, with n_kv_heads / tp even)."""
    cfg = ModelConfig(pattern="A", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, s2_attn={"group": GROUP})
    dense = _attention().double().train()
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
    total = 0
    for rank in range(2):
        shard = Attention(cfg, _TwoShards(cfg.init_std), "reference").double().train()
        with torch.no_grad():
            for name in ("q", "k", "v"):
                rows = getattr(shard, name).weight.shape[0]
                getattr(shard, name).weight.copy_(getattr(dense, name).weight[rank * rows:(rank + 1) * rows])
            columns = shard.out.weight.shape[1]
            shard.out.weight.copy_(dense.out.weight[:, rank * columns:(rank + 1) * columns])
        total = total + shard(x)
    assert (total - dense(x)).abs().max() < 1e-12


def test_eval_mode_and_the_decoding_state_use_full_attention():
    module, full = _attention().double(), _attention(None).double()
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
    expected = full(x)
    assert torch.equal(module.eval()(x), expected)
    module.train()
    assert (module(x) - expected).abs().max() > 1e-3
    assert (module(x, state={}) - expected).abs().max() < 1e-12  # cached decoding, even in train mode


def test_the_op_sees_each_group_only():
    """Dependence: in training, the output at t moves with the input at s exactly when s <= t shares t's
    group in some head (plain or shifted)."""
    module = _attention().double().train()
    x = torch.randn(1, SEQ, D_MODEL, dtype=torch.float64, requires_grad=True)
    for t in (0, 3, 4, 7, 8, 11, 12, SEQ - 1):
        (grad,) = torch.autograd.grad(module(x)[0, t].sum(), x)
        moved = grad[0].abs().sum(-1) > 0
        for s in range(SEQ):
            same = s // GROUP == t // GROUP or (s + GROUP // 2) // GROUP == (t + GROUP // 2) // GROUP
            assert bool(moved[s]) == (s <= t and same), (t, s)


def test_attention_span_counts_the_pairs_each_layer_computes():
    cfg = ModelConfig(pattern="AF", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, s2_attn={"group": GROUP})
    position = torch.arange(SEQ)
    pairs = 0
    for g in (position // GROUP, (position + GROUP // 2) // GROUP):
        pairs += ((g[:, None] == g[None, :]) & (position[:, None] >= position[None, :])).sum().item() / 2
    assert attention_span(cfg, SEQ, 0) == pytest.approx(SEQ * pairs / (SEQ * (SEQ + 1) / 2))
    full = ModelConfig(pattern="AF", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS)
    assert attention_span(full, SEQ, 0) == SEQ
    fewer = flops_per_token(full, SEQ) - flops_per_token(cfg, SEQ)
    assert fewer == pytest.approx(6 * (SEQ - attention_span(cfg, SEQ, 0)) * D_MODEL)


def _batch(generator, batch=16, period=2, vocab=32):
    """Sequences repeating a random motif of `period` tokens: from token `period` on, each is predictable
    from the one `period` back, across group borders too."""
    motif = torch.randint(vocab, (batch, period), generator=generator)
    tokens = motif.repeat(1, SEQ // period + 1)[:, :SEQ + 1]
    targets = tokens[:, 1:].clone()
    targets[:, :period - 1] = -100
    return tokens[:, :-1], targets


def test_a_tiny_model_learns_with_s2_attn_and_keeps_it_under_full_attention():
    cfg = ModelConfig(pattern="AF", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=32,
                      s2_attn={"group": GROUP})
    torch.manual_seed(0)
    model = Decoder(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    held_out = _batch(torch.Generator().manual_seed(1), batch=64)
    with torch.no_grad():
        before = model.eval()(*held_out).item()
    model.train()
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: threads only contend (seconds, not tens of seconds, under load)
    try:
        for _ in range(60):
            loss = model(*_batch(generator))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        after = model.eval()(*held_out).item()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # 3.4 -> 0.8 seen
    assert after < 0.3 * before, (before, after)  # 3.5 -> 0.2 seen


def _recipe(**model):
    return {"model": {"pattern": "AF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, **model},
            "data": {"task": "passkey", "seq_len": 64}}


@pytest.mark.parametrize("model, parallel, words", [
    ({"s2_attn": {"group": 6}}, {}, ["model.s2_attn.group=6", "data.seq_len=64"]),
    ({"s2_attn": {"group": 3}}, {}, ["model.s2_attn.group=3", "even"]),
    ({"s2_attn": {"group": 0}}, {}, ["model.s2_attn.group"]),
    ({"s2_attn": {"group": 8}, "attention_window": 8}, {}, ["model.s2_attn", "model.attention_window=8"]),
    ({"s2_attn": {"group": 8}, "n_kv_heads": 1}, {}, ["model.s2_attn", "model.n_kv_heads=1"]),
    ({"s2_attn": {"group": 8}}, {"tp": 2}, ["model.s2_attn", "model.n_kv_heads=2", "parallel.tp=2"]),
    ({"s2_attn": {"group": 8, "gruop": 8}}, {}, ["model.s2_attn.gruop", "did you mean 'group'"]),
])
def test_bad_s2_attn_is_a_one_line_error(model, parallel, words):
    raw = _recipe(**model)
    raw["parallel"] = parallel
    assert_recipe_refused(raw, words)


def test_odd_kv_heads_per_rank_are_refused_by_the_layer():
    with pytest.raises(ValueError, match="s2_attn"):
        _attention(n_kv_heads=1)


def _split_s2_decoder(rank, world):
    import torch.distributed as dist

    from parallel_harness import split_decoder_pairs

    torch.manual_seed(0)
    model = Decoder(ModelConfig(pattern="AFAF", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                                s2_attn={"group": 8})).double().train()
    _, _, pairs = split_decoder_pairs(model, world, rank, dist.group.WORLD, 32)
    return {name: ((split - unsplit).abs().max() / unsplit.abs().max()).item() for name, split, unsplit in pairs}


def test_s2_attn_under_context_parallelism_equals_one_process():
    """cp=2 (chunks of 8 tokens, groups of 8 and shifted groups across chunk borders): each half of the heads runs
    the ring with its group starts as document starts; logits and every parameter gradient equal one process."""
    from parallel_harness import run_ranks

    for errors in run_ranks(_split_s2_decoder, 2):
        for name, error in errors.items():  # RMSNorm weight gradients are float32 sums over tokens (rms_norm kernel)
            assert error < (1e-6 if "norm" in name else 1e-10), (name, error)
