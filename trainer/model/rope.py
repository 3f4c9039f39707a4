"""Rotary position frequencies with scaling for length extension: the inverse frequencies of RoPE
(Su et al. 2021, "RoFormer") and the factor that multiplies cos and sin, per scaling type.

    linear   position interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models
             via Positional Interpolation"): every frequency divided by `factor`.
    ntk      NTK-aware base change (bloc97, 2023, "NTK-Aware Scaled RoPE"): the base theta becomes
             theta * factor ** (d / (d - 2)), so the highest frequency is kept and the lowest is
             interpolated by exactly `factor`.
    dynamic  dynamic NTK (emozilla, 2023, "Dynamically Scaled RoPE"): the ntk base change with a factor
             that grows with the current sequence length s past the original context L:
             factor * s / L - (factor - 1); frequencies are unchanged while s <= L.
    yarn     YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"):
             "NTK-by-parts" interpolation, dimensions that turn more than beta_fast times over L are kept,
             those that turn fewer than beta_slow times are divided by `factor`, a linear ramp between; and
             an attention temperature sqrt(1/t) = 0.1 ln(factor) + 1 (their Eq. 21) applied to cos and sin,
             so that q . k is scaled by its square.
    llama3   Llama 3.1's scaling (Meta, "The Llama 3 Herd of Models", 2024, and its reference code):
             wavelengths shorter than L / high_freq_factor are kept, longer than L / low_freq_factor divided
             by `factor`, and a smooth blend between.

`scaling` everywhere here is a bare number (the linear factor; 1 means no scaling, the form recipes had
before the types existed) or an object with the fields of `model.rope_scaling` (trainer/config.py):
`type`, `factor`, `original_max_position` and the type's own fields; unset optional fields are None.

The base frequencies are theta ** (-2i / d) computed in float32 as RoFormer's and Llama's reference code
do, so that tables equal those a model was pretrained with; scalars (bases, ramp bounds, temperatures)
are computed in float64 and the per-dimension arithmetic in float32.
"""
from __future__ import annotations

import math

import torch

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # the paper's defaults for Llama (section 4.2)


def _field(scaling, name: str, default=None):
    value = getattr(scaling, name, None)
    return default if value is None else value


def scaling_type(scaling) -> str:
    """'linear' for a bare number, else scaling.type."""
    if scaling is None or isinstance(scaling, (int, float)):
        return "linear"
    return scaling.type


def scaling_factor(scaling) -> float:
    if scaling is None:
        return 1.0
    return float(scaling) if isinstance(scaling, (int, float)) else float(scaling.factor)


def is_dynamic(scaling) -> bool:
    """True when the frequencies depend on the current sequence length."""
    return scaling_type(scaling) == "dynamic" and scaling_factor(scaling) != 1.0


def base_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim / 2,) float32: theta ** (-2i / head_dim), i = 0 .. head_dim / 2 - 1."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def ntk_base(theta: float, head_dim: int, alpha: float) -> float:
    """The NTK-aware base for a length ratio alpha: the lowest frequency theta ** (-(d - 2) / d) is then
    divided by exactly alpha, the highest (1) is kept."""
    return theta * alpha ** (head_dim / (head_dim - 2))


def dynamic_alpha(factor: float, context_len: int | None, original: int) -> float:
    """Dynamic NTK's length ratio at the current length: 1 up to `original`, then rising linearly to `factor`
    at `original` and beyond (emozilla's rule: factor * s / L - (factor - 1))."""
    length = original if context_len is None else max(int(context_len), original)
    return factor * length / original - (factor - 1)


def yarn_temperature(factor: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (Eq. 21 with DeepSeek-V2's mscale multiplier);
    1 when factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(scaling) -> float:
    """The factor on cos and sin: `attention_factor` when given; with `mscale` and `mscale_all_dim` both
    given (DeepSeek-V2's form) the ratio of the two temperatures; else the paper's temperature."""
    factor = scaling_factor(scaling)
    given = _field(scaling, "attention_factor")
    if given is not None:
        return float(given)
    mscale, mscale_all_dim = _field(scaling, "mscale"), _field(scaling, "mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_temperature(factor, mscale) / yarn_temperature(factor, mscale_all_dim)
    return yarn_temperature(factor)


def yarn_dimension(rotations: float, head_dim: int, theta: float, original: int) -> float:
    """The (fractional) pair index i whose wavelength 2 pi theta ** (2i / d) fits `rotations` full turns in
    the original context: solves original / (2 pi theta ** (2i / d)) = rotations for i."""
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(scaling, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim / 2,) float32 in [0, 1]: 0 where a pair is kept (extrapolated), 1 where it is interpolated."""
    original = scaling.original_max_position
    low = yarn_dimension(_field(scaling, "beta_fast", YARN_BETA_FAST), head_dim, theta, original)
    high = yarn_dimension(_field(scaling, "beta_slow", YARN_BETA_SLOW), head_dim, theta, original)
    if _field(scaling, "truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001  # a step instead of a ramp; keeps the division finite
    index = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return ((index - low) / (high - low)).clamp(0, 1)


def llama3_frequencies(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    factor, original = scaling_factor(scaling), scaling.original_max_position
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    # Between the two wavelengths, blend by how many turns fit in the original context.
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(middle, blended, scaled)


def rope_frequencies(head_dim: int, theta: float, scaling=1.0, context_len: int | None = None,
                     device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) float32 on `device`, and the factor (a float) that multiplies
    cos and sin. `context_len`: the current sequence length, read by dynamic scaling only (None: the
    original context, i.e. no change)."""
    kind, factor = scaling_type(scaling), scaling_factor(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
    if kind == "ntk":
        return base_frequencies(head_dim, ntk_base(theta, head_dim, factor), device), 1.0
    if kind == "dynamic":
        alpha = dynamic_alpha(factor, context_len, scaling.original_max_position)
        return base_frequencies(head_dim, ntk_base(theta, head_dim, alpha) if alpha != 1 else theta, device), 1.0
    inv_freq = base_frequencies(head_dim, theta, device)
    if kind == "linear":
        return (inv_freq / factor if factor != 1 else inv_freq), 1.0
    if kind == "llama3":
        return llama3_frequencies(inv_freq, scaling), 1.0
    ramp = yarn_ramp(scaling, head_dim, theta, device)
    return inv_freq * (1 - ramp) + (inv_freq / factor) * ramp, yarn_attention_factor(scaling)
