"""Neural-ODE block (Chen et al. 2018, "Neural Ordinary Differential Equations"): continuous depth.

    h(1) = h(0) + integral_0^1 f(h(t), t) dt

f is a small residual sublayer conditioned on t (an MLP, or attention then MLP) whose weights are
shared across integration steps. Solved with torchdiffeq: fixed-step euler / midpoint / rk4 (orders
1, 2, 4) on exactly `steps` equal steps, or adaptive dopri5 (Dormand & Prince 1980) within rtol /
atol. With `adjoint` the backward pass solves the adjoint ODE (Pontryagin; Chen et al. 2018) instead
of storing every step's activations, so activation memory is flat in the number of steps.

Lock-step adaptive stepping. When f is split over ranks (tensor parallel: hidden width sharded,
state replicated; context parallel: state split along the sequence), every rank must accept and
reject the same steps, or the collectives inside f desynchronize. The error norm is therefore the
RMS over the *global* state: each rank contributes (sum of squares, element count) and
`lockstep_sum` adds them over the ranks holding the state. Replicas (tp) add equal shares, which
leaves the RMS unchanged, so one rule serves tp, cp and both. The adjoint pass uses a seminorm
(Kidger, Chen & Lyons 2021, "Hey, that's not an ODE": Faster ODE Adjoints via Seminorms): the step
error is measured on h and dL/dh only, not on the integrals of dL/dt and dL/dparams, which are
partial sums per rank under cp (shards under tp) and so cannot enter a norm that ranks agree on.
torchdiffeq's own "seminorm" keeps dL/dt, which is why ours is explicit.

Step budget. An adaptive solve that needs more than `max_steps` attempts (accepted + rejected, in
the forward or in the adjoint pass) raises `OdeStepLimitError`, a one-line error naming the knobs:
clamping instead would silently return h(1) at an unknown accuracy. The first solve to pass half the
budget logs one warning per block. Counts of function evaluations and steps of the last solve are
in `ODEBlock.stats()`; `ode_stats(model)` collects them for the training log.

Not with ZeRO-3: `adjoint` fails there (its backward reads the parameters after DeepSpeed has
partitioned them away: "setStorage ... out of bounds for storage of size 0", dp=2, ZeRO-3), and an
adaptive solve takes data-dependent numbers of steps on each dp rank while ZeRO-3 gathers parameters
at every evaluation of f. Data-parallel ranks need no lock-step under ZeRO 0-2.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.model.attention import Attention
from longtrain.trainer.model.init import set_rule
from longtrain.trainer.model.layers import RMSNorm
from longtrain.trainer.model.mlp import SwiGLU

logger = logging.getLogger(__name__)

ORDER = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": 5}
FIXED_STEP = ("euler", "midpoint", "rk4")


class OdeStepLimitError(LongtrainError):
    """An adaptive solve ran past model.ode.max_steps."""


class VectorField(nn.Module):
    """f(t, h): (batch, seq, d_model) -> same shape; t a scalar tensor in [0, 1]."""

    def __init__(self, cfg, linears, kind: str = "mlp", attention_backend: str = "auto", index: int | None = None):
        super().__init__()
        self.time = set_rule(nn.Parameter(torch.zeros(cfg.d_model)), "const", 0.0)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_hidden, linears)
        self.attn = Attention(cfg, linears, attention_backend, index) if kind == "attention_mlp" else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.attn is not None else None
        # (batch, seq) in-document positions of packed documents for the attention sublayer, set by the
        # O block for its solve (and kept for the adjoint pass, which evaluates f after forward returns)
        self.positions = None

    def forward(self, t, h):
        h_t = h + t.to(h.dtype) * self.time
        out = 0
        if self.attn is not None:
            out = self.attn(self.attn_norm(h_t), positions=self.positions)
            h_t = h_t + out
        return out + self.mlp(self.norm(h_t))


class Tally:
    """The function torchdiffeq integrates: f, plus counts of evaluations and steps per pass.

    torchdiffeq calls `callback_*` on the function it is handed (the `_adjoint` ones in the adjoint
    pass); only the callbacks the solver supports are defined, or it warns on every solve. An adaptive
    solve past `max_steps` attempts raises; crossing half of it calls `warn(phase, attempts)`.
    """

    def __init__(self, f: nn.Module, solver: str, max_steps: int, warn: Callable[[str, int], None]):
        self.f, self.solver, self.max_steps, self.warn = f, solver, max_steps, warn
        self.adaptive = solver not in FIXED_STEP
        self.phase = "forward"
        self.counts = {"nfe": 0, "attempts": 0, "steps": 0, "rejected": 0,
                       "nfe_backward": 0, "attempts_backward": 0, "steps_backward": 0, "rejected_backward": 0}
        self.callback_step = self.callback_step_adjoint = self._attempt
        if self.adaptive:
            self.callback_accept_step = self.callback_accept_step_adjoint = self._accept
            self.callback_reject_step = self.callback_reject_step_adjoint = self._reject

    def _key(self, name: str) -> str:
        return name if self.phase == "forward" else f"{name}_backward"

    def __call__(self, t, h):
        self.counts[self._key("nfe")] += 1
        return self.f(t, h)

    def _attempt(self, t0, y0, dt):
        key = self._key("attempts")
        self.counts[key] += 1
        attempts = self.counts[key]
        if not self.adaptive:
            self.counts[self._key("steps")] += 1
        elif attempts > self.max_steps:
            raise OdeStepLimitError(
                f"an O block's {self.solver} solve needed more than model.ode.max_steps={self.max_steps} steps in "
                f"the {self.phase} pass (t={float(t0):.3g}, dt={float(dt):.2g}); raise model.ode.max_steps, loosen "
                f"model.ode.rtol / model.ode.atol, or use a fixed-step solver")
        elif attempts == self.max_steps // 2 + 1:
            self.warn(self.phase, attempts)

    def _accept(self, t0, y0, dt):
        self.counts[self._key("steps")] += 1

    def _reject(self, t0, y0, dt):
        self.counts[self._key("rejected")] += 1


def rms_norm_over(local_sum: Callable[[torch.Tensor], torch.Tensor] | None):
    """The norm torchdiffeq uses to accept a step: the RMS over the state of every rank; given several
    tensors, the largest of their RMS norms (one collective for all of them).

    local_sum: None (one rank), or a function summing a float64 tensor (n, 2) over the ranks that hold
    parts or replicas of the state, with a result bitwise equal on each of them.
    """

    def norm(*tensors: torch.Tensor) -> torch.Tensor:
        moments = torch.stack([torch.stack([t.detach().to(torch.float64).pow(2).sum(),
                                            torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
                               for t in tensors])
        if local_sum is not None:
            moments = local_sum(moments)
        return (moments[:, 0] / moments[:, 1]).sqrt().max()

    return norm


def adjoint_seminorm(norm):
    """Norm of the adjoint state (dL/dt, h, dL/dh, dL/dparams): h and dL/dh only (Kidger et al. 2021).

    dL/dt and dL/dparams are integrals of per-token contributions, rank-local partial sums under cp
    (and shards under tp), so no rank could tell whether a step is accepted from them alone.
    """
    return lambda augmented: norm(augmented[1], augmented[2])


class ODEBlock(nn.Module):
    """x: (batch, seq, d_model) -> h(1), same shape and dtype.

    lockstep_sum: None, or set by parallel code to a function that sums a small float64 tensor over
    the ranks that share this block's state (tp and cp ranks of one replica) and returns bitwise the
    same result on each; see `rms_norm_over`. It only matters for adaptive solvers.
    """

    def __init__(self, cfg, linears, attention_backend: str = "auto", index: int | None = None):
        """index: the block's place in model.pattern (its attention sublayer's window, see Attention)."""
        super().__init__()
        self.ode = cfg.ode
        self.f = VectorField(cfg, linears, cfg.ode.sublayer, attention_backend, index)
        self.lockstep_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.tally: Tally | None = None
        self._warned = False

    @property
    def adaptive(self) -> bool:
        return self.ode.solver not in FIXED_STEP

    def solver_options(self) -> dict:
        if self.adaptive:
            # torchdiffeq's own cap (an AssertionError) sits one past ours, which raises first.
            options = {"max_num_steps": self.ode.max_steps + 1, "norm": rms_norm_over(self.lockstep_sum)}
            return dict(method=self.ode.solver, rtol=self.ode.rtol, atol=self.ode.atol, options=options)
        steps = self.ode.steps
        # An explicit grid: torchdiffeq's `step_size` grid is ceil((t1 - t0) / step_size + 1) points,
        # one too many when 1 / steps rounds down (an extra, nearly empty step).
        grid = lambda func, y0, t: torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype, device=t.device)
        return dict(method=self.ode.solver, options={"grid_constructor": grid})

    def forward(self, x, positions=None):
        """x: (batch, seq, d_model); positions: optional (batch, seq) in-document positions of packed documents,
        which the attention sublayer (model.ode.sublayer=attention_mlp) masks by; the MLP sublayer needs none."""
        self.f.positions = positions
        tally = Tally(self.f, self.ode.solver, self.ode.max_steps, self._warn_once)
        span = torch.tensor([0.0, 1.0], dtype=x.dtype if x.dtype == torch.float64 else torch.float32, device=x.device)
        kwargs = self.solver_options()
        if self.ode.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in self.f.parameters() if p.requires_grad)
            adjoint_options = dict(kwargs["options"])
            if self.adaptive:
                adjoint_options["norm"] = adjoint_seminorm(kwargs["options"]["norm"])
            out = odeint_adjoint(tally, x, span, adjoint_params=params, adjoint_options=adjoint_options, **kwargs)
        else:
            out = odeint(tally, x, span, **kwargs)
        tally.phase = "backward"  # later evaluations are the adjoint pass's
        self.tally = tally
        return out[-1]

    def _warn_once(self, phase: str, attempts: int) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("an O block's %s solve passed half of model.ode.max_steps=%d (%d steps) in the %s pass "
                           "(rtol=%g, atol=%g); past the cap training stops", self.ode.solver, self.ode.max_steps,
                           attempts, phase, self.ode.rtol, self.ode.atol)

    @property
    def last_nfe(self) -> int:
        return self.tally.counts["nfe"] if self.tally else 0

    def stats(self) -> dict:
        """Counts of the last solve: nfe and accepted steps, rejected steps (adaptive), and the adjoint
        pass's nfe and steps (after backward, adjoint on)."""
        if self.tally is None:
            return {}
        counts = self.tally.counts
        keys = ["nfe", "steps"] + (["rejected"] if self.adaptive else [])
        if self.ode.adjoint:
            keys += ["nfe_backward", "steps_backward"] + (["rejected_backward"] if self.adaptive else [])
        return {k: counts[k] for k in keys}


def ode_stats(model: nn.Module) -> dict:
    """{'ode/<layer>/<count>': int} for every O block of `model` (see `ODEBlock.stats`); <layer> is the
    block's index in the decoder's pattern ('blocks.2.mixer' -> '2'), else its module name."""
    stats = {}
    for name, block in model.named_modules():
        if isinstance(block, ODEBlock):
            layer = name.removeprefix("blocks.").removesuffix(".mixer") or "0"
            stats.update({f"ode/{layer}/{key}": value for key, value in block.stats().items()})
    return stats
