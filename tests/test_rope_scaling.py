"""RoPE scaling types (trainer/model/rope.py) against transformers as the peer: inverse frequencies and the
attention factor against its RoPE init functions, cos/sin tables against LlamaRotaryEmbedding; the bare
number form against linear; recipe errors; dynamic scaling's length under a KV cache and context parallelism."""
import functools
import math

import pytest
import torch

from longtrain.trainer.config import ModelConfig, RopeScalingConfig, recipe_from_dict
from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.model import rope
from longtrain.trainer.model.layers import rotary_tables

EPS32 = torch.finfo(torch.float32).eps

# (name, head_dim, theta, model.rope_scaling); original contexts are small so the tables stay short.
CASES = [
    ("linear", 64, 10000.0, dict(type="linear", factor=4.0)),
    ("linear-1", 32, 10000.0, dict(type="linear", factor=1.0)),
    ("dynamic", 64, 10000.0, dict(type="dynamic", factor=4.0, original_max_position=128)),
    ("dynamic-2", 128, 500000.0, dict(type="dynamic", factor=2.0, original_max_position=96)),
    ("yarn", 64, 10000.0, dict(type="yarn", factor=4.0, original_max_position=256)),
    ("yarn-betas", 128, 500000.0, dict(type="yarn", factor=8.0, original_max_position=128, beta_fast=16.0,
                                       beta_slow=2.0, truncate=False)),
    ("yarn-mscale", 64, 10000.0, dict(type="yarn", factor=16.0, original_max_position=256, mscale=0.707,
                                      mscale_all_dim=1.0)),
    ("yarn-attention-factor", 64, 10000.0, dict(type="yarn", factor=4.0, original_max_position=256,
                                                attention_factor=1.3)),
    ("llama3", 128, 500000.0, dict(type="llama3", factor=8.0, original_max_position=256, low_freq_factor=1.0,
                                   high_freq_factor=4.0)),
    ("llama3-2", 64, 10000.0, dict(type="llama3", factor=4.0, original_max_position=128, low_freq_factor=2.0,
                                   high_freq_factor=8.0)),
]
CASE_IDS = [c[0] for c in CASES]
PEER_NAMES = {"original_max_position": "original_max_position_embeddings"}


def peer_config(head_dim, theta, scaling: dict):
    """A transformers LlamaConfig with the same RoPE. Dynamic NTK's original context is the peer's
    max_position_embeddings; the other types name it original_max_position_embeddings."""
    from transformers import LlamaConfig
    params = {PEER_NAMES.get(k, k): v for k, v in scaling.items() if k != "type"}
    params.update(rope_type=scaling["type"], rope_theta=theta)
    original = scaling.get("original_max_position", 256)
    if scaling["type"] == "dynamic":
        params.pop("original_max_position_embeddings")
        max_position = original
    else:
        max_position = int(original * scaling["factor"])
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position, rope_parameters=params)


def peer_frequencies(head_dim, theta, scaling: dict, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[scaling["type"]](peer_config(head_dim, theta, scaling), "cpu",
                                                                      seq_len=seq_len)
    return inv_freq, float(attention_factor)


def lengths(scaling: dict) -> list:
    """Sequence lengths to check: dynamic scaling changes with the length, below and past the original."""
    if scaling["type"] != "dynamic":
        return [None]
    original = scaling["original_max_position"]
    return [None, original // 2, original, original + 1, 3 * original, int(original * scaling["factor"]) + 7]


@pytest.mark.parametrize("name, head_dim, theta, scaling", CASES, ids=CASE_IDS)
def test_frequencies_and_attention_factor_match_transformers(name, head_dim, theta, scaling):
    ours = RopeScalingConfig(**scaling)
    for seq_len in lengths(scaling):
        inv_freq, factor = rope.rope_frequencies(head_dim, theta, ours, context_len=seq_len)
        want, want_factor = peer_frequencies(head_dim, theta, scaling, seq_len)
        assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
        torch.testing.assert_close(inv_freq, want, rtol=1e-6, atol=0)
        assert factor == pytest.approx(want_factor, rel=1e-6, abs=0)
    # Each case reaches every regime of its type: kept, divided by factor, and blended between.
    ratio = inv_freq.double() / rope.base_frequencies(head_dim, theta).double()
    kept, divided = (ratio - 1).abs() < 1e-6, (ratio - 1 / scaling["factor"]).abs() < 1e-6
    if scaling["type"] in ("yarn", "llama3"):
        assert kept.any() and divided.any() and (~kept & ~divided).any(), ratio
    if name.startswith("yarn"):
        assert factor != 1.0  # the factor on cos and sin is exercised


def test_yarn_attention_factor_is_the_papers_temperature():
    # Peng et al. 2023, Eq. 21: sqrt(1/t) = 0.1 ln(s) + 1.
    cfg = RopeScalingConfig(type="yarn", factor=16.0, original_max_position=4096)
    assert rope.yarn_attention_factor(cfg) == pytest.approx(0.1 * math.log(16.0) + 1, rel=1e-12)
    _, factor = peer_frequencies(64, 10000.0, dict(type="yarn", factor=16.0, original_max_position=4096))
    assert factor == pytest.approx(0.1 * math.log(16.0) + 1, rel=1e-12)


@pytest.mark.parametrize("head_dim, theta, factor, original", [(64, 10000.0, 4.0, 64), (128, 500000.0, 2.0, 128)])
def test_static_ntk_matches_dynamic_ntk_at_the_length_where_their_ratios_agree(head_dim, theta, factor, original):
    """transformers 5.x has no static "ntk" type: its NTK-aware scaling is the dynamic one, whose base ratio
    at length s is factor * s / L - (factor - 1). That ratio equals `factor` at s = L (2 factor - 1) / factor,
    where our static ntk (bloc97's base theta * factor ** (d / (d - 2))) must agree with it."""
    seq_len = original * (2 * factor - 1) / factor
    assert seq_len == int(seq_len)
    inv_freq, attention_factor = rope.rope_frequencies(head_dim, theta, RopeScalingConfig(type="ntk", factor=factor))
    want, _ = peer_frequencies(head_dim, theta, dict(type="dynamic", factor=factor, original_max_position=original),
                               seq_len=int(seq_len))
    torch.testing.assert_close(inv_freq, want, rtol=1e-6, atol=0)
    assert attention_factor == 1.0
    # bloc97's property: the highest frequency is kept, the lowest divided by exactly `factor`.
    plain = rope.base_frequencies(head_dim, theta)
    assert inv_freq[0] == plain[0]
    assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-5)
    assert (inv_freq[1:] < plain[1:]).all()


def table_bound(ours_inv, peer_inv, positions, attention_factor):
    """The largest |cos| or |sin| difference two float32 tables may show: the angle p * f differs by p times
    the frequencies' difference plus the product's rounding (half an ulp on each side), cos and sin add their
    own rounding, all times the attention factor."""
    p = positions.double().max()
    angle = p * torch.maximum(ours_inv, peer_inv).double().max()
    delta = p * (ours_inv.double() - peer_inv.double()).abs().max() + EPS32 * angle
    return attention_factor * (delta + 2 * EPS32).item()


@pytest.mark.parametrize("name, head_dim, theta, scaling", CASES, ids=CASE_IDS)
def test_tables_match_llama_rotary_embedding(name, head_dim, theta, scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    ours = RopeScalingConfig(**scaling)
    original = scaling.get("original_max_position", 256)
    for seq_len in [n for n in lengths(scaling) if n is not None] or [int(2 * original)]:
        peer = LlamaRotaryEmbedding(peer_config(head_dim, theta, scaling))  # fresh: dynamic's cache grows only
        positions = torch.arange(seq_len)
        want_cos, want_sin = peer(torch.zeros(1, seq_len, head_dim), positions[None])
        cos, sin = rotary_tables(seq_len, head_dim, theta, ours)
        inv_freq, attention_factor = rope.rope_frequencies(head_dim, theta, ours, context_len=seq_len)
        bound = table_bound(inv_freq, peer.inv_freq, positions, attention_factor)
        half = head_dim // 2  # the peer repeats the table over both halves (rotate-half layout)
        for got, want in ((cos, want_cos[0]), (sin, want_sin[0])):
            assert got.shape == (seq_len, half)
            torch.testing.assert_close(want[:, half:], want[:, :half], rtol=0, atol=0)
            assert (got - want[:, :half]).abs().max().item() <= bound


def test_bare_number_is_linear_interpolation():
    cfg = ModelConfig(rope_scaling=2.5)
    assert cfg.rope_scaling == RopeScalingConfig(type="linear", factor=2.5)
    assert recipe_from_dict({"model": {"rope_scaling": 3}}).model.rope_scaling.factor == 3.0
    cos, sin = rotary_tables(300, 64, 10000.0, 2.5, offset=7)
    typed_cos, typed_sin = rotary_tables(300, 64, 10000.0, cfg.rope_scaling, offset=7)
    assert torch.equal(cos, typed_cos) and torch.equal(sin, typed_sin)
    # Chen et al. 2023: position p reads the unscaled table at p / factor (float64 reference).
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.outer(torch.arange(7, 307, dtype=torch.float64) / 2.5, inv)
    assert (cos.double() - angles.cos()).abs().max() < 1e-4 and (sin.double() - angles.sin()).abs().max() < 1e-4
    # The default is no scaling: the plain RoPE table.
    plain_cos, _ = rotary_tables(300, 64, 10000.0, ModelConfig().rope_scaling, offset=7)
    torch.testing.assert_close(plain_cos.double(), torch.outer(torch.arange(7, 307, dtype=torch.float64), inv).cos(),
                               rtol=0, atol=4e-5)


def test_recipe_round_trip_keeps_the_scaling(tmp_path):
    from longtrain.trainer.config import load_recipe, save_recipe
    yarn = dict(type="yarn", factor=4.0, original_max_position=4096, beta_fast=16.0)
    r = recipe_from_dict({"model": {"rope_scaling": yarn}})
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml").model.rope_scaling == r.model.rope_scaling
    assert r.model.rope_scaling.model_dump() == yarn  # unset optional fields are not written
    old = tmp_path / "old.yaml"
    old.write_text("model: {rope_scaling: 2.0}\n")  # a recipe from before the types
    assert load_recipe(old, ["model.rope_scaling=4"]).model.rope_scaling.factor == 4.0


@pytest.mark.parametrize("scaling, expected", [
    ({"type": "ntk2", "factor": 2}, "model.rope_scaling.type: Input should be 'linear', 'ntk', 'dynamic', 'yarn' or "
                                    "'llama3'"),
    ({"factor": 2}, "model.rope_scaling.type: Field required"),
    ({"type": "linear"}, "model.rope_scaling.factor: Field required"),
    ({"type": "ntk", "factor": 0.5}, "model.rope_scaling.factor: Input should be greater than or equal to 1"),
    (0.5, "model.rope_scaling=0.5: a bare number is the linear interpolation factor and must be >= 1"),
    ("4", "model.rope_scaling: Input should be a valid dictionary"),
    ({"type": "yarn", "factor": 4}, "model.rope_scaling.original_max_position is required for type=yarn"),
    ({"type": "dynamic", "factor": 4}, "model.rope_scaling.original_max_position is required for type=dynamic"),
    ({"type": "llama3", "factor": 8, "original_max_position": 8192, "low_freq_factor": 1},
     "model.rope_scaling.high_freq_factor is required for type=llama3"),
    ({"type": "yarn", "factor": 4, "original_max_position": 0}, "model.rope_scaling.original_max_position: Input "
                                                                "should be greater than 0"),
    ({"type": "yarn", "factor": 4, "original_max_position": 64, "beta_slow": -1}, "model.rope_scaling.beta_slow: "
                                                                                  "Input should be greater than 0"),
    ({"type": "yarn", "factor": 4, "original_max_position": 64, "attention_factor": 0},
     "model.rope_scaling.attention_factor: Input should be greater than 0"),
    ({"type": "llama3", "factor": 8, "original_max_position": 64, "low_freq_factor": 0, "high_freq_factor": 4},
     "model.rope_scaling.low_freq_factor: Input should be greater than 0"),
    ({"type": "yarn", "factor": 4, "original_max_position": 64, "beta_fast": 1, "beta_slow": 2},
     "model.rope_scaling.beta_fast=1 is below model.rope_scaling.beta_slow=2"),
    ({"type": "yarn", "factor": 4, "original_max_position": 64, "mscale": 1}, "model.rope_scaling.mscale and "
                                                                              "model.rope_scaling.mscale_all_dim go"),
    ({"type": "yarn", "factor": 4, "original_max_position": 64, "mscale": 1, "mscale_all_dim": 1,
      "attention_factor": 1.2}, "model.rope_scaling.attention_factor and model.rope_scaling.mscale both set"),
    ({"type": "llama3", "factor": 8, "original_max_position": 64, "low_freq_factor": 4, "high_freq_factor": 4},
     "model.rope_scaling.high_freq_factor=4 must be above model.rope_scaling.low_freq_factor=4"),
    ({"type": "linear", "factor": 2, "original_max_position": 64}, "model.rope_scaling.original_max_position does "
                                                                   "not apply to type=linear"),
    ({"type": "yarn", "factor": 2, "original_max_position": 64, "low_freq_factor": 1},
     "model.rope_scaling.low_freq_factor does not apply to type=yarn"),
    ({"type": "yarn", "factor": 2, "original_max_position": 64, "beta_fats": 1},
     "unknown key 'model.rope_scaling.beta_fats' (did you mean 'beta_fast'?)"),
])
def test_bad_rope_scaling_is_a_one_line_error(scaling, expected):
    with pytest.raises(LongtrainError) as err:
        recipe_from_dict({"model": {"rope_scaling": scaling}})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_ntk_needs_a_head_above_two_dims():
    with pytest.raises(LongtrainError, match=r"model.rope_scaling.type=dynamic needs a head dim .* above 2, got 2"):
        recipe_from_dict({"model": {"d_model": 8, "n_heads": 4, "n_kv_heads": 2,
                                    "rope_scaling": {"type": "dynamic", "factor": 2, "original_max_position": 8}}})


def tiny_attention(scaling, head_dim=16):
    from longtrain.trainer.model.attention import Attention
    from longtrain.trainer.model.layers import Linears
    cfg = ModelConfig(d_model=2 * head_dim, n_heads=2, n_kv_heads=1, rope_scaling=scaling, init_std=0.3)
    torch.manual_seed(0)
    return Attention(cfg, Linears(0.3), backend="torch").double()


def test_dynamic_decoding_reads_the_current_length():
    """With a KV cache each step's queries and keys are rotated at the length so far (past + new tokens),
    and cached keys keep the rotation they were given, as transformers' dynamic NTK does: checked against
    the attention written out by hand."""
    scaling = RopeScalingConfig(type="dynamic", factor=4.0, original_max_position=8)
    attn = tiny_attention(scaling)
    x = torch.randn(1, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    state = {}
    attn(x[:, :10], state=state)
    step = attn(x[:, 10:13], state=state)  # 3 new tokens at length 13

    def rotated(t, heads, start, length):
        from longtrain.kernels.rotary import reference
        cos, sin = rotary_tables(t.shape[1], 16, attn.theta, scaling, offset=start, context_len=length)
        return reference(t.view(1, t.shape[1], heads, 16), cos.double(), sin.double())

    q = rotated(attn.q(x[:, 10:]), 2, 10, 13)
    k = torch.cat([rotated(attn.k(x[:, :10]), 1, 0, 10), rotated(attn.k(x[:, 10:]), 1, 10, 13)], dim=1)
    v = attn.v(x).view(1, 13, 1, 16)
    scores = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) / 4.0
    scores = scores.masked_fill(torch.arange(13)[None, :] > torch.arange(10, 13)[:, None], float("-inf"))
    want = attn.out(torch.einsum("bhqk,bkd->bqhd", scores.softmax(-1), v[:, :, 0]).reshape(1, 3, 32))
    torch.testing.assert_close(step, want, rtol=1e-10, atol=1e-12)
    # The length matters: the tables at 13 and at 10 differ once past the original context.
    assert not torch.equal(rotary_tables(3, 16, attn.theta, scaling, offset=10, context_len=13)[0],
                           rotary_tables(3, 16, attn.theta, scaling, offset=10, context_len=10)[0])


@pytest.mark.parametrize("scaling", [2.0, dict(type="ntk", factor=4.0),
                                     dict(type="yarn", factor=4.0, original_max_position=8),
                                     dict(type="llama3", factor=4.0, original_max_position=8, low_freq_factor=1.0,
                                          high_freq_factor=4.0)], ids=["bare", "ntk", "yarn", "llama3"])
def test_static_types_decode_as_the_full_forward(scaling):
    attn = tiny_attention(scaling)
    x = torch.randn(2, 20, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = attn(x)
    state = {}
    steps = torch.cat([attn(x[:, :12], state=state)] + [attn(x[:, i:i + 1], state=state) for i in range(12, 20)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-12)


def test_dynamic_under_context_parallelism_reads_the_whole_length():
    """Each cp rank holds two zigzag chunks; its tables must be the full sequence's at its positions (the
    largest local position is not the length). Checked in one process with the hooks context parallelism
    installs, recording the rotated queries."""
    from longtrain.trainer.parallel import context
    scaling = RopeScalingConfig(type="dynamic", factor=4.0, original_max_position=8)
    attn = tiny_attention(scaling)
    seen = []
    attn.attend = lambda q, k, v: seen.append((q, k)) or q
    x = torch.randn(1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    attn(x)
    full_q, full_k = seen.pop()
    cp = 2
    for rank in range(cp):
        attn.positions = functools.partial(context._local_positions, cp=cp, rank=rank)
        attn.context_length = functools.partial(context._full_length, cp=cp)
        attn(context.zigzag_split(x, cp, rank))
        q, k = seen.pop()
        torch.testing.assert_close(q, context.zigzag_split(full_q, cp, rank), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k, context.zigzag_split(full_k, cp, rank), rtol=1e-12, atol=1e-12)


def test_scaled_tables_through_the_rotary_kernels():
    """YaRN's tables are not unit rotations (cos^2 + sin^2 = factor^2): every rotary backend, forward and
    backward, against float64 autograd of the reference."""
    from longtrain.kernels import rotary
    scaling = RopeScalingConfig(type="yarn", factor=4.0, original_max_position=16)
    cos, sin = rotary_tables(40, 16, 10000.0, scaling)
    assert (cos ** 2 + sin ** 2).sub(rope.yarn_attention_factor(scaling) ** 2).abs().max() < 1e-5
    g = torch.Generator().manual_seed(6)
    x, dy = torch.randn(2, 40, 3, 16, generator=g), torch.randn(2, 40, 3, 16, generator=g)
    x64 = x.double().requires_grad_()
    want = rotary.reference(x64, cos.double(), sin.double())
    want.backward(dy.double())
    usable = [b.name for b in rotary.registry.backends if b.supports(device=x.device, dtype=x.dtype) is None]
    assert "torch" in usable
    for backend in usable:
        xb = x.clone().requires_grad_()
        got = rotary.apply_rotary(xb, cos, sin, backend=backend)
        got.backward(dy)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(xb.grad.double(), x64.grad, rtol=0, atol=1e-5)
