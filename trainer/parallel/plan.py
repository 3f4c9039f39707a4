"""The layout plan: checks a recipe's tp / pp / cp / dp against its model and batch, places ranks,
counts parameters and estimates memory per rank, and balances pipeline stages. No devices needed.

Rank order follows megatron-core's `parallel_state` default (`order="tp-cp-ep-dp-pp"`): tp varies
fastest, then cp, then dp, then pp. Memory follows the ZeRO paper (Rajbhandari et al. 2020, sec. 3),
for how longtrain trains: float32 weights and gradients under train.bf16 too (autocast), so each
parameter costs 4 + 4 + 8 bytes (Adam's m and v), + 4 more under ZeRO 1-2 (DeepSpeed's float32 master
copy of the partition). ZeRO stage 1 partitions the optimizer states, 2 also the gradients, 3 also the
weights, over the data-parallel group (dp x cp here).
Activations are estimated per block type at seq_len / cp tokens with flash-style attention (O(seq)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from longtrain.trainer.engine import BUCKET_ELEMENTS
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.model.layers import Linears

GIB = 1024 ** 3
RK_STAGES = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": 6}


@dataclass(frozen=True)
class Layout:
    """Sizes of the four parallel dimensions; world = tp * cp * dp * pp."""
    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def coordinates(self, rank: int) -> dict:
        """Global rank -> {tp, cp, dp, pp} in megatron-core's default order (tp fastest)."""
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}

    def rank(self, tp=0, cp=0, dp=0, pp=0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def groups(self, dim: str) -> list[list[int]]:
        """All groups of ranks that differ only in `dim` ('tp', 'cp', 'dp', 'pp'), each sorted."""
        out: dict[tuple, list[int]] = {}
        for r in range(self.world):
            c = self.coordinates(r)
            key = tuple(v for k, v in c.items() if k != dim)
            out.setdefault(key, []).append(r)
        return sorted(out.values())


# ---- checks: each names the fields and the fix ----

def resolve_layout(parallel, world_size: int | None) -> Layout:
    """The layout for `world_size` processes (None: the recipe's tp*pp*cp*dp, which needs parallel.dp)."""
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size is None:
        if parallel.dp is None:
            raise LongtrainError("no world size: pass --world-size or set parallel.dp in the recipe")
        world_size = model_parallel * parallel.dp
    if world_size <= 0:
        raise LongtrainError(f"world size {world_size} must be positive")
    if world_size % model_parallel:
        raise LongtrainError(f"world size {world_size} is not divisible by parallel.tp*pp*cp="
                             f"{parallel.tp}*{parallel.pp}*{parallel.cp}={model_parallel}")
    dp = world_size // model_parallel
    if parallel.dp is not None and parallel.dp != dp:
        raise LongtrainError(f"parallel.dp={parallel.dp} does not match world size {world_size} / "
                             f"(parallel.tp*pp*cp={model_parallel}) = {dp}; remove parallel.dp or set it to {dp}")
    return Layout(tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp)


def check_tensor_parallel(model, tp: int) -> None:
    if tp == 1:
        return
    letters = set(model.pattern)
    needs = []
    if "A" in letters or (("O" in letters) and model.ode.sublayer == "attention_mlp"):
        needs += [("model.n_heads", model.n_heads), ("model.n_kv_heads", model.n_kv_heads)]
    if "M" in letters:
        needs.append(("Mamba inner width model.expand*model.d_model", model.d_inner))
    if letters & {"F", "O"}:
        needs.append(("MLP hidden width from model.mlp_ratio*model.d_model", model.d_hidden))
    needs.append(("model.vocab_size", model.vocab_size))
    for name, value in needs:
        if value % tp:
            raise LongtrainError(f"parallel.tp={tp} does not divide {name}={value}")


def check_pipeline(recipe, pp: int) -> None:
    n_layers = len(recipe.model.pattern)
    if pp > n_layers:
        raise LongtrainError(f"parallel.pp={pp} is more pipeline stages than layers in model.pattern "
                             f"{recipe.model.pattern!r} ({n_layers})")
    if pp > 1 and recipe.parallel.zero_stage > 1:
        raise LongtrainError(f"parallel.zero_stage={recipe.parallel.zero_stage} with parallel.pp={pp}: DeepSpeed's "
                             "pipeline engine supports ZeRO stage 0 or 1 only; set parallel.zero_stage=1")


def check_context_parallel(recipe, cp: int) -> None:
    seq = recipe.data.seq_len
    if seq % (2 * cp):
        raise LongtrainError(f"data.seq_len={seq} is not divisible by 2*parallel.cp={2 * cp} "
                             "(the zigzag split gives each cp rank two equal chunks)")
    chunk = seq // (2 * cp)
    if cp > 1 and "M" in recipe.model.pattern and chunk < recipe.model.d_conv - 1:
        raise LongtrainError(f"data.seq_len/(2*parallel.cp)={chunk} is shorter than model.d_conv-1="
                             f"{recipe.model.d_conv - 1}: each zigzag chunk must hold the Mamba conv's history")


def check_batch(recipe, layout: Layout) -> None:
    p, t = recipe.parallel, recipe.train
    # The global batch is train.micro_batch_size * train.grad_accum * dp in every layout; a pipeline
    # cuts each rank's share of it into parallel.micro_batches equal pieces.
    per_rank = t.micro_batch_size * t.grad_accum
    if layout.pp > 1 and per_rank % p.micro_batches:
        raise LongtrainError(f"parallel.micro_batches={p.micro_batches} does not divide train.micro_batch_size*"
                             f"train.grad_accum={t.micro_batch_size}*{t.grad_accum}={per_rank} (sequences per step "
                             "per data-parallel rank, cut into pipeline micro-batches)")
    if layout.pp == 1 and p.micro_batches != 1:
        raise LongtrainError(f"parallel.micro_batches={p.micro_batches} applies only with parallel.pp > 1; "
                             "use train.grad_accum to accumulate micro-batches")


def check_layout(recipe, world_size: int | None) -> Layout:
    """Every check of the layout against model and batch; returns the layout or raises LongtrainError."""
    layout = resolve_layout(recipe.parallel, world_size)
    check_tensor_parallel(recipe.model, layout.tp)
    check_pipeline(recipe, layout.pp)
    check_context_parallel(recipe, layout.cp)
    check_batch(recipe, layout)
    return layout


RUNTIME_BYTES = 0.35 * 2**30  # measured: a training process's resident memory before its model (CPU, gloo)


# ---- parameters, from the model code itself on the meta device ----

class ShardShapes(Linears):
    """A `Linears` with the local shapes of one tensor-parallel rank, for counting on the meta device."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp

    def column(self, in_features, out_features, bias=False):
        return nn.Linear(in_features, out_features // self.tp, bias=bias)

    def row(self, in_features, out_features, bias=False):
        return nn.Linear(in_features // self.tp, out_features, bias=bias)

    def shared_input(self, x):
        return x

    def embedding(self, vocab, dim):
        return nn.Embedding(vocab // self.tp, dim)


# The recipe fields that shape each block's weights, to name when they are too large to build.
SIZE_FIELDS = {"A": ("d_model", "n_heads", "n_kv_heads"), "M": ("d_model", "expand", "d_state", "d_conv"),
               "O": ("d_model", "mlp_ratio"), "F": ("d_model", "mlp_ratio")}


class TooLargeToEstimate(LongtrainError):
    """Model sizes whose weights overflow a 64-bit byte count: no machine holds them."""


def block_parameters(model_cfg, tp: int = 1) -> dict[str, int]:
    """Parameters of one block of each letter in the pattern, on one tp rank. Built on the meta device
    (no memory); sizes whose weights would pass 2^63 bytes raise TooLargeToEstimate."""
    from longtrain.trainer.model.decoder import make_block

    counts = {}
    for letter in sorted(set(model_cfg.pattern)):
        try:
            with torch.device("meta"):
                counts[letter] = sum(p.numel() for p in make_block(letter, model_cfg, ShardShapes(tp)).parameters())
        except RuntimeError as e:  # torch: "Storage size calculation overflowed with sizes=[...]"
            if "overflow" not in str(e).lower():
                raise
            sizes = ", ".join(f"model.{name}={getattr(model_cfg, name):.6g}" if name == "mlp_ratio"
                              else f"model.{name}={getattr(model_cfg, name)}" for name in SIZE_FIELDS[letter])
            raise TooLargeToEstimate(f"one weight of an {letter} block at {sizes} would hold more than 2^63 bytes "
                                     "(8 EiB): lower these sizes") from None
    return counts


# ---- cost per block (forward FLOPs per token) and stage balance ----

def function_evaluations(ode_cfg) -> int:
    """Vector-field evaluations of one O block per forward pass (dopri5: a guess of 4 accepted steps)."""
    steps = ode_cfg.steps if ode_cfg.solver != "dopri5" else min(4, ode_cfg.max_steps)
    return RK_STAGES[ode_cfg.solver] * steps


def block_cost(letter: str, model_cfg, seq_len: int, params: int) -> float:
    """Forward FLOPs per token: 2 per weight, attention scores 2 * seq * d (causal average), the scan ~9 per
    (channel, state). O blocks pay their vector field once per function evaluation. seq_len: the block's
    `attention_span` (data.seq_len for full causal attention)."""
    m = model_cfg
    cost = 2.0 * params
    if letter == "A":
        cost += 2.0 * seq_len * m.d_model
    elif letter == "M":
        cost += 9.0 * m.d_inner * m.d_state
    elif letter == "O":
        if m.ode.sublayer == "attention_mlp":
            cost += 2.0 * seq_len * m.d_model
        cost *= function_evaluations(m.ode)
    return cost


def attention_span(model_cfg, seq_len: int, index: int) -> float:
    """The length whose full causal attention computes as many query-key scores as block `index` of the pattern
    does over seq_len tokens: seq_len for full causal attention; seq_len * pairs / (seq_len (seq_len + 1) / 2)
    for a sliding window (model.attention_window with its sinks, outside the global layers of
    model.attention_global_every) or S²-Attn's groups (model.s2_attn, training), counting the pairs each
    computes. Packed documents are not counted (their borders vary by batch)."""
    def causal(n):
        return n * (n + 1) / 2

    window = model_cfg.attention_layer_window(index)
    if window is not None and window < seq_len:
        extra, sinks = seq_len - window, model_cfg.attention_sinks  # queries past the window; sinks they also see
        pairs = causal(window) + extra * window + (causal(min(extra, sinks)) + max(extra - sinks, 0) * sinks)
    elif window is None and model_cfg.s2_attn is not None:
        group = model_cfg.s2_attn.group
        plain = [min(group, seq_len - start) for start in range(0, seq_len, group)]
        starts = [0, *range(group // 2, seq_len, group)]
        shifted = [end - start for start, end in zip(starts, starts[1:] + [seq_len])]
        pairs = (sum(map(causal, plain)) + sum(map(causal, shifted))) / 2  # half the heads each
    else:
        return float(seq_len)
    return seq_len * pairs / causal(seq_len)


def partition(costs: list[float], stages: int) -> list[int]:
    """Contiguous split of `costs` (each > 0) into `stages` non-empty parts minimising the largest part;
    among equal splits, the earliest cuts. Returns boundaries [0, b1, ..., len(costs)] (DeepSpeed's `parts`).

    Dynamic programming over (stages, layers): best[s][i] = min over j of max(best[s-1][j], sum(costs[j:i])).
    best[s-1][j] grows with j and the sum shrinks, so the minimum is where they cross: a binary search
    makes it O(stages * n log n), so that a long pattern cannot stall `longtrain plan` or the preflight."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [0.0] + [inf] * n
    cuts = []
    for s in range(1, stages + 1):
        new, cut = [inf] * (n + 1), [0] * (n + 1)
        for i in range(s, n + 1):
            def h(j):
                return max(best[j], prefix[i] - prefix[j])
            lo, hi = s - 1, i  # first j in [s-1, i) with best[j] >= the last part's sum (hi: none)
            while lo < hi:
                mid = (lo + hi) // 2
                if best[mid] >= prefix[i] - prefix[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            j = lo if lo < i else i - 1
            if lo > s - 1:  # left of the crossing the last part dominates: its smallest value is just before it
                left = lo - 1
                while left > s - 1 and h(left - 1) == h(left):  # equal sums (zero-cost layers): the earliest
                    left -= 1
                if lo >= i or h(left) <= h(j):
                    j = left
            new[i], cut[i] = h(j), j
        best = new
        cuts.append(cut)
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cuts[s - 1][i]
        bounds.append(i)
    return bounds[::-1]


# ---- activations ----

def activation_elements(letter: str, model_cfg, tp: int) -> float:
    """Elements per token kept for the backward pass by one block (rough, from the block code):
    the residual input and norm output (2 d) plus each intermediate the block's autograd saves."""
    m = model_cfg
    d = m.d_model
    if letter == "A":
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        # q, k, v projections, rotated q and k, attention output, its log-sum-exp (float32: 2 elements)
        return 2 * d + (q + 2 * kv + q + kv + q + 2 * m.n_heads) / tp
    if letter == "M":
        dt_rank = math.ceil(d / 16)
        # in_x, in_z, conv out, silu out, delta, scan out, gated out; x_proj output is full width
        return 2 * d + 7 * m.d_inner / tp + dt_rank + 2 * m.d_state
    mlp = 2 * d + 3 * m.d_hidden / tp  # norm in/out, gate, up, silu(gate)*up
    if letter == "F":
        return mlp
    if letter == "O":
        per_eval = mlp + (activation_elements("A", m, tp) if m.ode.sublayer == "attention_mlp" else 0)
        evals = 1 if m.ode.adjoint else function_evaluations(m.ode)
        return per_eval * evals + 2 * d  # state at each step
    raise ValueError(letter)


@dataclass
class StagePlan:
    layers: str
    first_layer: int
    params: int
    cost: float
    memory: dict = field(default_factory=dict)


@dataclass
class Plan:
    layout: Layout
    stages: list[StagePlan]
    total_params: int
    notes: list[str]

    @property
    def max_memory_bytes(self) -> float:
        return max(s.memory["total"] for s in self.stages)


def build_plan(recipe, world_size: int | None = None) -> Plan:
    """Check the layout and estimate parameters, memory and cost per pipeline stage (one rank of each)."""
    layout = check_layout(recipe, world_size)
    m, t = recipe.model, recipe.train
    local = block_parameters(m, layout.tp)
    dense = block_parameters(m, 1)
    embed_local = (m.vocab_size // layout.tp) * m.d_model
    head_local = embed_local  # tied: the head reuses the embedding; untied: a column-parallel (vocab/tp, d)
    costs = [block_cost(c, m, attention_span(m, recipe.data.seq_len, i), dense[c]) for i, c in enumerate(m.pattern)]
    bounds = partition(costs, layout.pp)
    total_params = sum(dense[c] for c in m.pattern) + m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    # Weights and gradients stay float32 (train.bf16 is autocast: bfloat16 matmuls and activations).
    bytes_per_element = 2 if t.bf16 else 4
    # Adam's two moments; ZeRO 1-2 also step a float32 copy of their partition (stage_1_and_2.py clones it),
    # ZeRO-3 steps the partition itself (trainer/engine.py, share_float32_master).
    optimizer_bytes = 12 if recipe.parallel.zero_stage in (1, 2) else 8
    zero_group = layout.dp * layout.cp
    sequences = (t.micro_batch_size * t.grad_accum // recipe.parallel.micro_batches if layout.pp > 1
                 else t.micro_batch_size)  # per forward pass
    tokens = sequences * recipe.data.seq_len // layout.cp
    stages = []
    for s in range(layout.pp):
        letters = m.pattern[bounds[s]:bounds[s + 1]]
        params = sum(local[c] for c in letters)
        if s == 0:
            params += embed_local
        if s == layout.pp - 1:
            params += m.d_model + (head_local if (not m.tie_embeddings or layout.pp > 1) else 0)
        stage = StagePlan(letters, bounds[s], params, sum(costs[bounds[s]:bounds[s + 1]]))
        stage.memory = stage_memory(recipe, layout, stage, s, tokens, bytes_per_element, optimizer_bytes, zero_group)
        stages.append(stage)
    notes = []
    if layout.pp > 1 and recipe.parallel.micro_batches < layout.pp:
        notes.append(f"parallel.micro_batches={recipe.parallel.micro_batches} < parallel.pp={layout.pp}: "
                     "the 1F1B pipeline idles; use at least pp micro-batches")
    return Plan(layout, stages, total_params, notes)


def stage_memory(recipe, layout, stage, index, tokens, bytes_per_element, optimizer_bytes, zero_group) -> dict:
    m, t, zero = recipe.model, recipe.train, recipe.parallel.zero_stage
    weights = stage.params * 4 / (zero_group if zero >= 3 else 1)
    grads = stage.params * 4 / (zero_group if zero >= 2 else 1)
    optimizer = stage.params * optimizer_bytes / (zero_group if zero >= 1 else 1)
    per_block = [activation_elements(c, m, layout.tp) * tokens * bytes_per_element for c in stage.layers]
    if t.activation_checkpointing:
        stored = len(stage.layers) * m.d_model * tokens * bytes_per_element + max(per_block, default=0)
    else:
        stored = sum(per_block)
    # 1F1B: stage i holds the activations of up to (pp - i) micro-batches in flight.
    in_flight = min(layout.pp - index, recipe.parallel.micro_batches) if layout.pp > 1 else 1
    activations = stored * in_flight
    if index == layout.pp - 1:  # float32 logits and their gradient, on the vocab shard
        activations += 2 * tokens * (m.vocab_size // layout.tp) * 4
    # The process itself (interpreter, torch, DeepSpeed: 0.3 GiB resident on CPU), and what DeepSpeed holds
    # beyond the partitions: a reduce bucket under ZeRO 1-3, ZeRO-3's gathered and prefetched parameters.
    runtime = RUNTIME_BYTES + (BUCKET_ELEMENTS * 4 if zero >= 1 else 0) + (2 * BUCKET_ELEMENTS * bytes_per_element if zero >= 3 else 0)
    total = weights + grads + optimizer + activations + runtime
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations, "runtime": runtime,
            "total": total}


def format_bytes(count: float) -> str:
    """1536 -> '1.50 KiB'; binary units up to EiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.3g} EiB"


def check_memory(recipe, plan: Plan, capacity: int, where: str, ranks: int = 1) -> None:
    """Refuse, in one line with the figures, a plan whose largest estimated memory per rank times the `ranks`
    that share `capacity` bytes (`where`: "this machine's RAM", a GPU's memory) does not fit in it."""
    need = plan.max_memory_bytes * ranks
    if need <= capacity:
        return
    largest = max(plan.stages, key=lambda stage: stage.memory["total"]).memory
    parts = ", ".join(f"{k} {format_bytes(largest[k])}" for k in ("weights", "grads", "optimizer", "activations"))
    shared = f" x {ranks} ranks" if ranks > 1 else ""
    raise LongtrainError(
        f"estimated memory {format_bytes(plan.max_memory_bytes)} per rank{shared} ({parts}) exceeds {where} of "
        f"{format_bytes(capacity)}: lower data.seq_len={recipe.data.seq_len}, train.micro_batch_size="
        f"{recipe.train.micro_batch_size} or the model sizes (model.d_model={recipe.model.d_model}, model.vocab_size="
        f"{recipe.model.vocab_size}), set train.activation_checkpointing=true, or spread the model over more ranks "
        "(parallel.tp, pp, cp, zero_stage; `longtrain plan` shows the estimate)")


def format_plan(recipe, plan: Plan, max_rank_lines: int = 64) -> str:
    lay = plan.layout
    lines = [f"plan: {recipe.name} | world {lay.world} = tp {lay.tp} x cp {lay.cp} x dp {lay.dp} x pp {lay.pp} | "
             f"{plan.total_params / 1e9:.3f} B parameters | pattern {recipe.model.pattern} | "
             f"seq_len {recipe.data.seq_len} ({recipe.data.seq_len // lay.cp} per cp rank) | "
             f"zero {recipe.parallel.zero_stage} | {'bf16' if recipe.train.bf16 else 'float32'}",
             "ranks (megatron order: tp fastest, then cp, dp, pp):"]
    for r in range(min(lay.world, max_rank_lines)):
        c = lay.coordinates(r)
        lines.append(f"  rank {r:>4}: tp {c['tp']} cp {c['cp']} dp {c['dp']} pp {c['pp']}")
    if lay.world > max_rank_lines:
        lines.append(f"  ... {lay.world - max_rank_lines} more (rank = tp + tp*(cp + cp*(dp + dp*pp)))")
    total_cost = sum(s.cost for s in plan.stages)
    lines.append("stages (one rank of each; memory per rank in GiB):")
    for i, s in enumerate(plan.stages):
        mem = s.memory
        lines.append(f"  stage {i}: layers {s.first_layer}-{s.first_layer + len(s.layers) - 1} {s.layers} | "
                     f"cost {100 * s.cost / total_cost:.1f}% | params/rank {s.params / 1e6:.1f} M | "
                     f"weights {mem['weights'] / GIB:.2f} grads {mem['grads'] / GIB:.2f} "
                     f"optimizer {mem['optimizer'] / GIB:.2f} activations {mem['activations'] / GIB:.2f} "
                     f"runtime {mem['runtime'] / GIB:.2f} = {mem['total'] / GIB:.2f}")
    lines.append(f"largest estimated memory per rank: {plan.max_memory_bytes / GIB:.2f} GiB")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
