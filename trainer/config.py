"""The typed recipe: YAML -> validated pydantic models, with `section.key=value` overrides.

Unknown keys are errors with a "did you mean" suggestion; cross-field checks are small named
functions run by `Recipe.check`. Each component receives its own sub-config, never the whole recipe.

Types are strict: an int field takes an int (not `true`, not `"5"`, not `5.0`), a float field an int or a
finite float. The YAML is read by trainer/recipe_file.py (bounded safe loader, duplicate keys refused).
An empty recipe file is refused: `{}` trains every default on purpose.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

from longtrain.trainer.errors import LongtrainError
from longtrain.trainer.recipe_file import RecipeDumper, bounded, parse_yaml, read_recipe_file, short

LAYER_LETTERS = {"A": "attention", "M": "mamba", "O": "ode", "F": "mlp"}
PositiveInt = Field(gt=0)


def _int64(value: int) -> int:
    # Sizes end up in torch and numpy shapes (int64): a larger int cannot be a size, and would overflow
    # float arithmetic (mlp_ratio * d_model) before the memory estimate could refuse it.
    if not -(2 ** 63) <= value < 2 ** 63:
        raise PydanticCustomError("int64", "Input should be less than 2^63 in magnitude (64-bit sizes)")
    return value


Int = Annotated[int, AfterValidator(_int64)]  # an AfterValidator keeps each field's own gt / ge bounds


class Section(BaseModel):
    # strict: `steps: true` is not 1 and `steps: 2.5` is not 2; a float field still takes an int (3 -> 3.0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class OdeConfig(Section):
    solver: Literal["euler", "midpoint", "rk4", "dopri5"] = "rk4"
    steps: Int = Field(4, gt=0, description="fixed-step solvers: number of steps over t in [0, 1]")
    rtol: float = Field(1e-3, gt=0)
    atol: float = Field(1e-4, gt=0)
    max_steps: Int = Field(64, gt=0, description="adaptive solvers: cap on accepted + rejected steps")
    adjoint: bool = False
    sublayer: Literal["mlp", "attention_mlp"] = "mlp"


ROPE_TYPE_FIELDS = {  # what each model.rope_scaling.type reads besides `type` and `factor`
    "linear": (),
    "ntk": (),
    "dynamic": ("original_max_position",),
    "yarn": ("original_max_position", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
             "truncate"),
    "llama3": ("original_max_position", "low_freq_factor", "high_freq_factor"),
}
ROPE_TYPE_REQUIRED = {"dynamic": ("original_max_position",), "yarn": ("original_max_position",),
                      "llama3": ("original_max_position", "low_freq_factor", "high_freq_factor")}


class RopeScalingConfig(Section):
    """model.rope_scaling: RoPE length extension (trainer/model/rope.py holds the math). The fields and their
    meaning are transformers' `rope_parameters` (`original_max_position` is its
    `original_max_position_embeddings`); a field the type does not read is refused, unset ones are None."""
    type: Literal["linear", "ntk", "dynamic", "yarn", "llama3"]
    factor: float = Field(ge=1.0, description="context extension ratio: new length / original_max_position")
    original_max_position: Int | None = Field(None, gt=0, description="the context length the model was trained "
                                              "at (dynamic, yarn, llama3)")
    beta_fast: float | None = Field(None, gt=0, description="yarn: pairs turning more often than this over the "
                                    "original context keep their frequency (default 32)")
    beta_slow: float | None = Field(None, gt=0, description="yarn: pairs turning less often than this are "
                                    "interpolated by factor (default 1)")
    mscale: float | None = Field(None, gt=0, description="yarn, with mscale_all_dim: attention factor "
                                 "(0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1) (DeepSeek-V2)")
    mscale_all_dim: float | None = Field(None, gt=0, description="yarn: see mscale")
    attention_factor: float | None = Field(None, gt=0, description="yarn: the factor on cos and sin; default "
                                           "0.1 ln(factor) + 1")
    truncate: bool | None = Field(None, description="yarn: round the ramp's ends to whole pairs (default true)")
    low_freq_factor: float | None = Field(None, gt=0, description="llama3: wavelengths above "
                                          "original_max_position / low_freq_factor are divided by factor")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3: wavelengths below "
                                           "original_max_position / high_freq_factor are kept")

    @model_validator(mode="after")
    def _fields_of_the_type(self):
        own = ROPE_TYPE_FIELDS[self.type]
        for name in (n for n in RopeScalingConfig.model_fields if n not in ("type", "factor") and n not in own):
            if getattr(self, name) is not None:
                fields = ", ".join(("factor",) + own)
                raise ValueError(f"model.rope_scaling.{name} does not apply to type={self.type} (its fields: {fields})")
        for name in ROPE_TYPE_REQUIRED.get(self.type, ()):
            if getattr(self, name) is None:
                raise ValueError(f"model.rope_scaling.{name} is required for type={self.type}"
                                 + (": the context length the model was trained at"
                                    if name == "original_max_position" else ""))
        if self.type == "yarn":
            fast = 32.0 if self.beta_fast is None else self.beta_fast
            slow = 1.0 if self.beta_slow is None else self.beta_slow
            if fast < slow:
                raise ValueError(f"model.rope_scaling.beta_fast={fast:g} is below model.rope_scaling.beta_slow="
                                 f"{slow:g}; beta_fast counts the faster turns (defaults 32 and 1)")
            if (self.mscale is None) != (self.mscale_all_dim is None):
                raise ValueError("model.rope_scaling.mscale and model.rope_scaling.mscale_all_dim go together "
                                 "(the attention factor is their temperatures' ratio): give both or neither")
            if self.attention_factor is not None and self.mscale is not None:
                raise ValueError("model.rope_scaling.attention_factor and model.rope_scaling.mscale both set the "
                                 "attention factor: give one of them")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor:g} must be above "
                             f"model.rope_scaling.low_freq_factor={self.low_freq_factor:g} (Llama 3.1: 4 and 1)")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class S2AttnConfig(Section):
    """model.s2_attn: shifted sparse attention (S²-Attn; Chen et al. 2023, "LongLoRA", arXiv 2309.12307) while
    training: each query sees the keys of its own group of G tokens (groups start at multiples of G), and half of
    the heads use groups shifted by G/2 (starting at G/2 + m*G; the first is [0, G/2)), so information crosses
    group borders through the shifted heads. Rotary positions stay the sequence's own. Under context
    parallelism each half of the heads runs the ring with its group starts as document starts. Evaluation, generation
    and cached decoding use full attention, as LongLoRA's inference does. Within packed documents a group also
    ends where its document does. Unlike LongLoRA's roll, the last shifted group does not wrap around to the
    sequence's first tokens. The shifted heads are those of the odd-numbered kv heads (with all the query heads
    that share them), which is the same set of heads under every parallel.tp."""
    group: Int = Field(gt=0, description="tokens per group G: even (the shift is G/2), at least 2, dividing "
                       "data.seq_len")


class ModelConfig(Section):
    pattern: str = "AMOF"
    d_model: Int = Field(128, gt=0)
    n_heads: Int = Field(4, gt=0)
    n_kv_heads: Int = Field(2, gt=0)
    mlp_ratio: float = Field(8 / 3, gt=0, description="MLP hidden width over d_model (F blocks, O blocks' f); "
                             "0.25 to 64, see check_mlp_width")
    vocab_size: Int = Field(4000, gt=0)
    d_state: Int = Field(16, gt=0)
    d_conv: Int = Field(4, gt=0)
    expand: Int = Field(2, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScalingConfig = Field(RopeScalingConfig(type="linear", factor=1.0),
                                            description="RoPE length extension: {type: linear|ntk|dynamic|yarn|"
                                            "llama3, factor: F, ...}; a bare number F means {type: linear, factor: F}")
    attention_window: Int | None = Field(None, gt=0, description="sliding-window attention: each query sees "
                                         "the last N tokens of its document, itself included (flash-attn's "
                                         "window_size=(N-1, 0)); unset: full causal attention")
    attention_sinks: Int = Field(0, ge=0, description="with model.attention_window: the first N tokens of each "
                                 "document stay visible to every later query (StreamingLLM's attention sinks)")
    attention_global_every: Int | None = Field(
        None, gt=0, description="with model.attention_window: every N-th attention layer is full causal, the others "
        "use the window; attention layers (A blocks, and O blocks with ode.sublayer=attention_mlp) are counted in "
        "pattern order from 1, and layer n is global when n % N == 0 ((N-1) local then 1 global: Megatron-Core's "
        "window_attn_skip_freq=N, transformers' Gemma sliding_window_pattern=N); unset: every layer uses the window")
    s2_attn: S2AttnConfig | None = Field(None, description="LongLoRA's shifted sparse attention in training: "
                                         "{group: G}; see S2AttnConfig. Unset: full attention")
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    ode: OdeConfig = OdeConfig()
    init_from: str | None = Field(None, description="start from the weights of this run directory's newest "
                                  "complete checkpoint (or of this step_* directory), with a fresh optimizer, "
                                  "schedule, step count and data position; data.seq_len and model.rope_scaling "
                                  "may differ from the source's (trainer/init_from.py)")

    @field_validator("init_from")
    @classmethod
    def _init_from_path(cls, value):
        if value is not None and not value.strip():
            raise ValueError("model.init_from='' names no run: give a run directory or a checkpoint (step_*) "
                             "directory, or leave it unset")
        return value

    @field_validator("rope_scaling", mode="before")
    @classmethod
    def _bare_rope_factor(cls, value):
        """A bare number is the linear interpolation factor, the form recipes had before the types."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value >= 1:  # also NaN
                raise ValueError(f"model.rope_scaling={value!r}: a bare number is the linear interpolation factor "
                                 "and must be >= 1 (1: no scaling)")
            return {"type": "linear", "factor": value}
        return value

    @model_validator(mode="after")
    def _rope_scaling_fits_heads(self):
        # The NTK base change raises theta to d / (d - 2): a head of 2 dims has no such base.
        if self.rope_scaling.type in ("ntk", "dynamic") and self.d_model % self.n_heads == 0 and self.head_dim <= 2:
            raise ValueError(f"model.rope_scaling.type={self.rope_scaling.type} needs a head dim "
                             f"model.d_model/model.n_heads above 2, got {self.head_dim}")
        return self

    def attention_layer_window(self, index: int) -> int | None:
        """The window (tokens a query sees) of the attention in block `index` of the pattern, or None for full
        causal attention: model.attention_window, except in the global layers of model.attention_global_every."""
        if self.attention_window is None or self.attention_global_every is None:
            return self.attention_window
        number = sum(1 for letter in self.pattern[:index + 1] if self._attends(letter))  # 1-based, as Megatron-Core
        return None if number % self.attention_global_every == 0 else self.attention_window

    def _attends(self, letter: str) -> bool:
        return letter == "A" or (letter == "O" and self.ode.sublayer == "attention_mlp")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        return 16 * ((int(self.mlp_ratio * self.d_model) + 15) // 16)


class TokenizerConfig(Section):
    vocab_size: Int = Field(4000, gt=0)
    model_type: Literal["bpe", "unigram"] = "bpe"
    path: str | None = Field(None, description="an existing sentencepiece .model; trained from the corpus when None")


class PasskeyConfig(Section):
    digits: Int = Field(5, gt=0, description="digits of the hidden number")
    loss: Literal["answer", "full"] = Field("answer", description="loss on the answer digits only, or on every token")


class MqarConfig(Section):
    pairs: Int = Field(8, gt=0, description="key-value pairs per sequence, each queried once")
    keys: Int = Field(64, gt=0, description="size of the key vocabulary")
    values: Int = Field(64, gt=0, description="size of the value vocabulary")


class DataConfig(Section):
    corpus: list[str] = Field(default_factory=lambda: ["stdlib"],
                              description="'stdlib' (Python's own sources), files, directories, or .jsonl files")
    text_field: str = "text"
    max_bytes: Int = Field(8_000_000, gt=0, description="read at most this many bytes of corpus")
    seq_len: Int = Field(256, gt=0)
    eval_fraction: float = Field(0.02, gt=0, lt=0.5)
    tokenizer: TokenizerConfig = TokenizerConfig()
    task: Literal["text", "passkey", "mqar"] = "text"
    packing: Literal["documents", "concat"] | None = Field(
        None, description="text: 'documents' (each packed sequence carries its tokens' in-document positions; no "
        "token attends to, or carries state from, another document) or 'concat' (one stream, documents see their "
        "predecessors). Default: documents, or concat under parallel.pp > 1 (the pipeline does not carry positions)")
    passkey: PasskeyConfig = PasskeyConfig()
    mqar: MqarConfig = MqarConfig()
    task_lengths: list[Int] | None = Field(
        None, description="synthetic tasks: training sequences take these sample lengths in turn; a length below "
        "data.seq_len packs data.seq_len / length samples as documents (no sample sees another; rotary positions "
        "restart), so one run trains at several lengths, e.g. [128, 1024] to extend a context and keep the "
        "original. Each must divide data.seq_len. Unset: one sample of data.seq_len per sequence")


class TrainConfig(Section):
    steps: Int = Field(300, gt=0)
    micro_batch_size: Int = Field(8, gt=0)
    grad_accum: Int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: Int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    max_nonfinite_steps: Int = Field(5, ge=1, description="skipped steps (NaN or Inf gradients) in a row that stop "
                                     "the run, after a checkpoint at that step")
    bf16: bool = False
    activation_checkpointing: bool = False
    eval_interval: Int = Field(50, gt=0)
    eval_batches: Int = Field(4, gt=0)
    log_interval: Int = Field(10, gt=0)
    sample_tokens: Int = Field(64, ge=0, description="tokens generated at the end of training (0: none)")
    threads: Int | None = Field(None, gt=0, description="CPU threads per process (None: torch's default)")


class CheckpointConfig(Section):
    interval: Int = Field(100, gt=0)
    keep_last: Int = Field(2, gt=0)
    reshardable: bool = Field(True, description="also write each parameter's slice and Adam moments keyed by "
                              "dense name, so the checkpoint loads under another tp/pp/cp/dp/ZeRO layout "
                              "(costs about one more copy of the model and optimizer state on disk)")


class RunConfig(Section):
    dir: str | None = Field(None, description="run directory; default runs/<recipe name>")
    seed: Int = 0


class KernelsConfig(Section):
    attention: str = Field("auto", description="auto, or a backend of kernels/attention.py to force")
    scan: str = Field("auto", description="auto, or a backend of kernels/scan.py to force")

    @field_validator("attention", "scan")
    @classmethod
    def _known_backend(cls, name: str, info) -> str:
        """A name the op's registry knows. Whether that backend can run (device, build) is checked where it
        runs; the recipe may be validated on another machine (`longtrain plan`, the Ray driver)."""
        if name == "auto":
            return name
        from longtrain.kernels import attention, scan  # imports torch: only for a named backend
        registry = {"attention": attention.registry, "scan": scan.registry}[info.field_name]
        if name not in registry.names():
            raise ValueError(f"kernels.{info.field_name}={short(name)} is not a backend; valid choices: auto, "
                             f"{', '.join(registry.names())}")
        return name


class ParallelConfig(Section):
    tp: Int = Field(1, gt=0)
    pp: Int = Field(1, gt=0)
    cp: Int = Field(1, gt=0)
    dp: Int | None = Field(None, gt=0, description="data-parallel size; inferred from the world size when None")
    zero_stage: Int = Field(0, ge=0, le=3)
    micro_batches: Int = Field(1, gt=0, description="pipeline micro-batches per step (pp > 1)")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective that waits longer for a peer rank "
                                        "fails, naming the rank and the op (trainer/faults.py)")


class LaunchConfig(Section):
    """How `longtrain launch ray` places workers; its command-line flags override these."""
    num_workers: Int | None = Field(None, gt=0, description="training processes; default parallel.tp*pp*cp*dp, or 1")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="0: CPU workers on gloo; 1: one GPU per worker on nccl")
    max_failures: Int = Field(3, ge=-1, description="worker-group restarts before giving up (-1: unlimited)")


class Recipe(Section):
    name: str = "run"
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    kernels: KernelsConfig = KernelsConfig()
    parallel: ParallelConfig = ParallelConfig()
    launch: LaunchConfig = LaunchConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.name))

    @model_validator(mode="after")
    def _cross_checks(self):
        for check in CHECKS:
            check(self)
        return self


# ---- cross-field checks: each names the fields and the fix ----

def check_pattern(r: Recipe) -> None:
    bad = sorted(set(r.model.pattern) - set(LAYER_LETTERS))
    if not r.model.pattern or bad:
        valid = ", ".join(f"{k}={v}" for k, v in LAYER_LETTERS.items())
        raise ValueError(f"model.pattern={r.model.pattern!r} has unknown letter(s) {''.join(bad) or '(empty)'}; valid: {valid}")


def check_heads(r: Recipe) -> None:
    m = r.model
    if m.d_model % m.n_heads:
        raise ValueError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}")
    if m.n_heads % m.n_kv_heads:
        raise ValueError(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    if m.head_dim % 2:
        raise ValueError(f"head dim model.d_model/model.n_heads={m.head_dim} must be even for rotary embeddings")


def check_window(r: Recipe) -> None:
    m = r.model
    if m.attention_window is None:
        if m.attention_sinks:
            raise ValueError(f"model.attention_sinks={m.attention_sinks} needs model.attention_window (sinks are the "
                             "tokens kept visible beyond the window)")
        return
    if m.attention_window > r.data.seq_len:
        raise ValueError(f"model.attention_window={m.attention_window} is larger than data.seq_len={r.data.seq_len}: "
                         "such a window is full causal attention; unset model.attention_window or lower it")


def check_global_every(r: Recipe) -> None:
    m = r.model
    if m.attention_global_every is not None and m.attention_window is None:
        raise ValueError(f"model.attention_global_every={m.attention_global_every} needs model.attention_window (the "
                         "window of the other attention layers); set it, or unset model.attention_global_every")


def check_s2_attn(r: Recipe) -> None:
    m, group = r.model, r.model.s2_attn.group if r.model.s2_attn is not None else None
    if group is None:
        return
    if group < 2 or group % 2:
        raise ValueError(f"model.s2_attn.group={group} must be even and at least 2 (half the heads shift by group/2)")
    if r.data.seq_len % group:
        raise ValueError(f"model.s2_attn.group={group} does not divide data.seq_len={r.data.seq_len}; choose a group "
                         "that does (LongLoRA: a quarter of the sequence)")
    if m.attention_window is not None:
        raise ValueError(f"model.s2_attn with model.attention_window={m.attention_window}: S²-Attn stands in for full "
                         "attention while training; unset one of them")
    if m.n_kv_heads % r.parallel.tp == 0 and (m.n_kv_heads // r.parallel.tp) % 2:
        raise ValueError(f"model.s2_attn needs an even number of kv heads per tensor-parallel rank (half of them shift), "
                         f"got model.n_kv_heads={m.n_kv_heads} / parallel.tp={r.parallel.tp}")


def check_vocab(r: Recipe) -> None:
    if r.data.task == "text" and r.data.tokenizer.path is None and r.data.tokenizer.vocab_size > r.model.vocab_size:
        raise ValueError(f"data.tokenizer.vocab_size={r.data.tokenizer.vocab_size} exceeds "
                         f"model.vocab_size={r.model.vocab_size}; the embedding needs a row per piece")


def check_mlp_width(r: Recipe) -> None:
    # Below d_model / 4 the MLP is a bottleneck narrower than any published design (2 to 4, SwiGLU 8/3), and
    # a tiny ratio rounds the hidden width to 0 (0.001 * 128): an F block that computes nothing. Above 64,
    # the width is a typo, not a design; it also keeps mlp_ratio * d_model far from float overflow.
    m = r.model
    if m.mlp_ratio > 64:
        raise ValueError(f"model.mlp_ratio={m.mlp_ratio:g} is wider than any MLP design; use 0.25 <= mlp_ratio <= 64 "
                         "(published MLPs use 2 to 4, SwiGLU 8/3)")
    if m.mlp_ratio < 0.25:
        raise ValueError(f"model.mlp_ratio={m.mlp_ratio:g} gives an MLP hidden width of {m.d_hidden} for model.d_model="
                         f"{m.d_model}, a bottleneck (or an empty block); use 0.25 <= mlp_ratio <= 64 (published MLPs "
                         "use 2 to 4, SwiGLU 8/3)")


def check_task_vocab(r: Recipe) -> None:
    # Checked here, before the task builds a symbol list of keys + values entries.
    q = r.data.mqar
    if r.data.task == "mqar" and 1 + q.keys + q.values > r.model.vocab_size:
        raise ValueError(f"model.vocab_size={r.model.vocab_size} is smaller than data.task=mqar's vocabulary of "
                         f"1 + data.mqar.keys + data.mqar.values = {1 + q.keys + q.values} symbols")


def check_ode_zero3(r: Recipe) -> None:
    # ZeRO-3 frees gathered parameters between uses; torchdiffeq's adjoint pass re-enters f later and
    # finds empty storage ("setStorage ... storage of size 0"), seen at dp=2.
    if "O" in r.model.pattern and r.model.ode.adjoint and r.parallel.zero_stage == 3:
        raise ValueError("model.ode.adjoint=true does not work with parallel.zero_stage=3; "
                         "use zero_stage 1 or 2, or adjoint=false")


def check_packing(r: Recipe) -> None:
    if r.data.packing == "documents" and r.parallel.pp > 1:
        raise ValueError("data.packing=documents does not work with parallel.pp > 1 yet (the pipeline stages do not "
                         "carry the in-document positions); use data.packing=concat or pp=1")


def check_task_lengths(r: Recipe) -> None:
    lengths = r.data.task_lengths
    if lengths is None:
        return
    if r.data.task == "text":
        raise ValueError(f"data.task_lengths={lengths} is for synthetic tasks (data.task=passkey or mqar); text "
                         "sequences pack documents by data.packing")
    if not lengths or any(n <= 0 or r.data.seq_len % n for n in lengths):
        raise ValueError(f"data.task_lengths={lengths}: every length must be positive and divide data.seq_len="
                         f"{r.data.seq_len} (shorter samples are packed to fill a sequence)")
    if r.parallel.pp > 1 and min(lengths) < r.data.seq_len:
        raise ValueError(f"data.task_lengths={lengths} packs samples as documents, which does not work with "
                         "parallel.pp > 1 yet (the pipeline stages do not carry in-document positions)")


def packing(r: Recipe) -> str:
    """The packing a recipe resolves to: 'documents' or 'concat' for text, 'task' for synthetic tasks (one
    sample per sequence); data.packing unset is documents, or concat under parallel.pp > 1."""
    if r.data.task != "text":
        return "task"
    return r.data.packing or ("concat" if r.parallel.pp > 1 else "documents")


CHECKS = [check_pattern, check_heads, check_mlp_width, check_vocab, check_task_vocab, check_ode_zero3, check_packing,
          check_window, check_global_every, check_s2_attn, check_task_lengths]


# ---- loading ----

def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_fields(cls, loc):
    """The pydantic model class at a dotted location, for suggestions."""
    for part in loc:
        field = cls.model_fields.get(part)
        # an optional section (`S2AttnConfig | None`) suggests from its model
        kinds = [field.annotation, *get_args(field.annotation)] if field is not None else []
        sections = [kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)]
        if not sections:
            return None
        cls = sections[0]
    return cls


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    where = ".".join(loc)
    if e["type"] == "extra_forbidden":
        parent = _model_fields(Recipe, loc[:-1])
        hint = _suggest(loc[-1], parent.model_fields) if parent and len(loc[-1]) < 100 else ""
        return bounded(f"{source}: unknown key {short(where)}{hint}")
    if e["type"] == "value_error":
        return bounded(f"{source}: {str(e['msg']).removeprefix('Value error, ')}")
    value = e.get("input")
    shown = f" (got {short(value)})" if not isinstance(value, dict) else ""
    return bounded(f"{source}: {where or 'recipe'}: {e['msg']}{shown}")


def parse_overrides(overrides: list[str]) -> dict:
    """['train.steps=10', 'model.pattern=AMF'] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise LongtrainError(f"override {short(item)} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override {short(item)}") if raw != "" else None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LongtrainError(f"override {short(item)}: {part!r} is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (safe loader), apply overrides, validate. Raises LongtrainError in one line."""
    if path is None:
        path = default_recipe_path()
    path = Path(path)
    raw = read_recipe_file(path)
    raw.setdefault("name", path.stem)
    return recipe_from_dict(_merge(raw, parse_overrides(list(overrides))), source=str(path))


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LongtrainError(_one_line(e, source)) from None


def default_recipe_path() -> Path:
    """The quickstart recipe shipped inside the package (the embedded default)."""
    import longtrain.recipes
    return Path(list(longtrain.recipes.__path__)[0]) / "quickstart.yaml"


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.dump(recipe.model_dump(mode="json"), Dumper=RecipeDumper, sort_keys=False))
