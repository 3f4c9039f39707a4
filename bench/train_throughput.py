"""Training throughput, MFU and peak memory by layer pattern and sequence length, side by side with
same-size `transformers` models (Llama for attention, Mamba for Mamba) trained by a plain PyTorch loop.

    python bench/train_throughput.py                                  # every model, 256 to 8k tokens, fp32 (+ bf16, below)
    python bench/train_throughput.py --seq-lens 1k,2k,4k,8k,16k,32k --steps 3 --timeout 900
    python bench/train_throughput.py --models "longtrain A,transformers Llama" --seq-lens 4k --precisions fp32,bf16
    python bench/train_throughput.py --precisions bf16 --seq-lens 1k,2k,4k,8k --plot throughput.png

Every (model, length) runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own;
`act MiB` is that peak minus the resident memory after the model and optimizer were built, i.e. what
training at that length adds. After the table come the ratios to the peers, then the growth of `act MiB`
between the two longest lengths, as MiB per 1k tokens and as the exponent k of memory ~ length**k
(1: linear, 2: quadratic); `--plot` draws tokens/s, MFU and activation memory against the length.

longtrain trains through its DeepSpeed engine and its decoder's own loss (chunked linear +
cross-entropy, no full logits), with its CPU kernels (attention, the loss's softmax, RMSNorm, SwiGLU,
rotary) and fused AdamW, as `longtrain train` does; the peers through torch.optim.AdamW with the same
settings and their own modules, on the same seeded token batches (batch 1). MFU is the longtrain
model's FLOPs per token (PaLM appendix convention, see trainer/metrics.py; a peer of the same size
counts the same FLOPs) times tokens/s over the matmul rate of the run's precision, measured here
before the runs. A row's time is its fastest timed step (after one warm-up step) over `--repeats`
fresh processes, which run round robin with the other rows of the same length so that a slow spell
of a shared machine hits them all; `--json` also keeps every step and the median.

Precisions (default `auto`: fp32, plus bf16 where the CPU multiplies bfloat16 at least as fast as
float32, i.e. has AVX512-BF16 or AMX): `fp32` trains in float32; `bf16` trains both frameworks under
the same torch.autocast(bfloat16) with float32 weights and optimizer (longtrain's `train.bf16: true`,
and the standard mixed-precision loop for the peer). Its MFU is against the measured bfloat16 matmul rate.
On CPUs with AVX512-BF16 longtrain's attention then multiplies bfloat16 with float32 accumulation
(csrc/common/cpu_bf16_gemm.h); torch's SDPA does its own bfloat16 path.

Clocks: `tokens/s` is by the process's CPU time (process_time) times the thread count, i.e. the rate
with each thread on a core of its own; on a machine shared with other work, wall time mostly measures
the neighbours. The peak is measured the same way. `wall tok/s` is by the wall clock, for reference.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    # name: (framework, pattern); patterns of one size family: 2 Llama layers = AFAF, 4 Mamba layers = MMMM
    "longtrain A": ("longtrain", "AFAF"),
    "transformers Llama": ("llama", "AFAF"),
    "longtrain M": ("longtrain", "MMMM"),
    "transformers Mamba": ("mamba", "MMMM"),
    "longtrain hybrid": ("longtrain", "AMMF"),
    "longtrain O": ("longtrain", "AOFO"),
}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_config(args, pattern: str):
    from longtrain.trainer.config import ModelConfig, OdeConfig
    return ModelConfig(pattern=pattern, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       vocab_size=args.vocab, d_state=16, expand=2, d_conv=4,
                       ode=OdeConfig(solver=args.ode_solver, steps=args.ode_steps))


def build_peer(framework: str, cfg, seq_len: int):
    """A transformers model of the same shape as the longtrain pattern (random init, no downloads)."""
    if framework == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_hidden,
                             num_hidden_layers=cfg.pattern.count("A"), num_attention_heads=cfg.n_heads,
                             num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=seq_len,
                             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                             attention_bias=False, mlp_bias=False)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)
    from transformers import MambaConfig, MambaForCausalLM
    config = MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=cfg.d_state,
                         num_hidden_layers=cfg.pattern.count("M"), expand=cfg.expand, conv_kernel=cfg.d_conv,
                         time_step_rank=math.ceil(cfg.d_model / 16), use_bias=False, use_conv_bias=True,
                         tie_word_embeddings=True)
    return MambaForCausalLM(config)


def child(spec: dict) -> dict:
    """One (model, length) measurement; runs in its own process."""
    import torch
    import torch.nn.functional as F

    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    framework, pattern = MODELS[spec["model"]]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    seq_len = spec["seq_len"]
    cfg = model_config(args, pattern)
    from longtrain.trainer.metrics import evaluations, flops_per_token
    from longtrain.trainer.model.ode import ode_stats
    from longtrain.trainer.model.decoder import Decoder, count_parameters
    reference = Decoder(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (args.steps + 1, 1, seq_len + 1), generator=torch.Generator().manual_seed(1))

    if framework == "longtrain":
        from longtrain.trainer.config import ParallelConfig, TrainConfig
        from longtrain.trainer.engine import build_engine, init_distributed
        init_distributed()
        model = reference
        train_cfg = TrainConfig(lr=1e-4, warmup_steps=0, steps=args.steps + 1, micro_batch_size=1)
        engine, _, _ = build_engine(model, train_cfg, ParallelConfig(), dp_size=1)

        def step(batch):
            with autocast:
                loss = engine(batch[:, :-1], batch[:, 1:])  # the decoder's own loss, as in `longtrain train`
            engine.backward(loss)
            engine.step()
    else:
        model = build_peer(framework, cfg, seq_len)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def step(batch):
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            logits = logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.train()
    setup_rss = current_rss_bytes()
    times, cpu_times = [], []
    for i in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(tokens[i])
        times.append(time.perf_counter() - start)
        cpu_times.append((time.process_time() - cpu_start) / args.threads)
    if framework == "longtrain":
        flops = flops_per_token(cfg, seq_len, evaluations(ode_stats(model)))  # O blocks: the last solve's evaluations
    else:
        reference(tokens[0][:, :8])
        flops = flops_per_token(cfg, seq_len, evaluations(ode_stats(reference)))
    return {"model": spec["model"], "precision": spec["precision"], "seq_len": seq_len,
            "parameters": count_parameters(model), "flops_per_token": flops,
            "cpu_seconds": cpu_times[1:], "wall_seconds": times[1:],
            "peak_rss_bytes": rss_bytes(), "activation_bytes": rss_bytes() - setup_rss}


def merge_runs(runs: list[dict]) -> dict:
    """One row from the repeats of one (model, precision, length): the fastest timed step (the least
    disturbed by other work on the machine), the largest peak memory."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    merged = dict(good[0])
    seconds = min(t for r in good for t in r["cpu_seconds"])
    merged.update(seconds_per_step=seconds, tokens_per_s=merged["seq_len"] / seconds,
                  wall_tokens_per_s=merged["seq_len"] / min(t for r in good for t in r["wall_seconds"]),
                  median_tokens_per_s=merged["seq_len"] / statistics.median(t for r in good for t in r["cpu_seconds"]),
                  peak_rss_bytes=max(r["peak_rss_bytes"] for r in good),
                  activation_bytes=max(r["activation_bytes"] for r in good), runs=len(good))
    return merged


def run_child(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["args"]["threads"]), "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec["model"], "precision": spec["precision"], "seq_len": spec["seq_len"],
                "error": f"over {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": spec["model"], "precision": spec["precision"], "seq_len": spec["seq_len"],
                "error": tail[:100]}
    return json.loads(lines[-1])


def matmul_peak(threads: int, precision: str = "fp32", size: int = 1024, seconds: float = 0.5) -> float:
    """Matmul FLOP/s (float32, or bfloat16 for "bf16") by process CPU time times threads (see the module
    docstring)."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, cpu_start, start = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        a @ b
        count += 1
    return 2 * size ** 3 * count / ((time.process_time() - cpu_start) / threads)


def parse_lengths(text: str) -> list[int]:
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="256,512,1k,2k,4k,8k", help="comma list; k = 1024")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--llama-max-len", default="4k", help="skip the transformers Llama peer above this length")
    parser.add_argument("--hf-mamba-max-len", default="256",
                        help="skip the transformers Mamba peer above this length (its CPU path, a Python loop over "
                             "sequence-minor slices, grows with the square of the length in backward)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--ode-solver", default="midpoint")
    parser.add_argument("--ode-steps", type=int, default=2)
    parser.add_argument("--precisions", default="auto",
                        help="comma list of fp32, bf16 (see the module docstring); auto: fp32, and bf16 where this "
                             "CPU's measured bfloat16 matmul rate is at least its float32 rate")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per (model, precision, length), run round robin; the fastest step counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per (model, length) subprocess")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also draw tokens/s, MFU and activation memory against the sequence length to this PNG")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; valid: {', '.join(MODELS)}")
    auto = args.precisions == "auto"
    precisions = ["fp32", "bf16"] if auto else [p.strip() for p in args.precisions.split(",")]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        parser.error(f"--precisions takes fp32 and/or bf16 or auto, got {args.precisions!r}")
    peaks = {p: max(matmul_peak(args.threads, p) for _ in range(4)) for p in precisions}
    if auto and peaks["bf16"] < peaks["fp32"]:
        # Without bfloat16 matmul instructions (AVX512-BF16, AMX) torch emulates them, often tens of times
        # slower than float32: a bf16 row would measure the emulation, not either framework.
        print(f"# bf16 left out: its measured matmul rate ({peaks['bf16'] / 1e9:.1f} GFLOP/s) is below float32's "
              f"({peaks['fp32'] / 1e9:.1f}) on this CPU; --precisions fp32,bf16 runs it anyway")
        precisions = ["fp32"]
        del peaks["bf16"]
    lengths = parse_lengths(args.seq_lens)
    peer_max = {"llama": parse_lengths(args.llama_max_len)[0], "mamba": parse_lengths(args.hf_mamba_max_len)[0]}
    spec_args = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
    measured = ", ".join(f"{p} {peaks[p] / 1e9:.1f}" for p in precisions)
    print(f"# measured matmul peak (GFLOP/s by CPU time on {args.threads} thread(s)): {measured}; "
          f"d_model {args.d_model}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, batch 1, torch {torch.__version__}")
    results = []
    header = (f"{'model':<20} {'pattern':<7} {'prec':<4} {'seq':>6} {'params':>9} {'s/step':>8} {'tokens/s':>9} "
              f"{'MFU %':>6} {'peak MiB':>9} {'act MiB':>8} {'wall tok/s':>10}")
    print(header)
    print("-" * len(header))
    for seq_len in lengths:
        configs = [(model, precision) for model in models for precision in precisions
                   if MODELS[model][0] == "longtrain" or seq_len <= peer_max[MODELS[model][0]]]
        runs = {config: [] for config in configs}
        # Round robin, in alternating order, so that a slow spell of a shared machine hits every config.
        for repeat in range(args.repeats):
            for model, precision in configs if repeat % 2 == 0 else configs[::-1]:
                done = runs[(model, precision)]
                if done and "error" in done[-1]:
                    continue
                done.append(run_child({"model": model, "precision": precision, "seq_len": seq_len,
                                       "args": spec_args}, args.timeout))
        for model, precision in configs:
            r = merge_runs(runs[(model, precision)])
            results.append(r)
            row = f"{model:<20} {MODELS[model][1]:<7} {precision:<4} {seq_len:>6}"
            if "error" in r:
                print(f"{row} {'':>9} {r['error']}", flush=True)
                continue
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peaks[precision]
            print(f"{row} {r['parameters']:>9,} {r['seconds_per_step']:>8.3f} {r['tokens_per_s']:>9,.0f} "
                  f"{100 * r['mfu']:>6.1f} {r['peak_rss_bytes'] / 2**20:>9,.0f} {r['activation_bytes'] / 2**20:>8,.0f} "
                  f"{r['wall_tokens_per_s']:>10,.0f}", flush=True)
    print_ratios(results)
    print_memory_growth(results)
    if args.plot:
        print(f"# plot: {plot_results(results, args.plot, peaks)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peaks, "args": spec_args, "results": results}, f, indent=1)
    return 0


def print_ratios(results: list[dict]) -> None:
    """longtrain over its peer at each length: at the same precision, and each at its fastest precision."""
    by = {(r["model"], r["precision"], r["seq_len"]): r for r in results if "error" not in r}
    lines = []
    for ours, peer in [("longtrain A", "transformers Llama"), ("longtrain M", "transformers Mamba")]:
        for seq_len in sorted({key[2] for key in by}):
            for precision in ("fp32", "bf16"):
                r, p = by.get((ours, precision, seq_len)), by.get((peer, precision, seq_len))
                if r and p:
                    lines.append(f"{ours:<12} vs {peer:<19} {seq_len:>6} {precision}: "
                                 f"{r['tokens_per_s'] / p['tokens_per_s']:5.2f}x tokens/s, activation memory "
                                 f"{r['activation_bytes'] / 2**20:,.0f} vs {p['activation_bytes'] / 2**20:,.0f} MiB")
            best = [max((r for (m, _, n), r in by.items() if m == model and n == seq_len),
                        key=lambda r: r["tokens_per_s"], default=None) for model in (ours, peer)]
            if all(best) and {best[0]["precision"], best[1]["precision"]} != {best[0]["precision"]}:
                lines.append(f"{ours:<12} vs {peer:<19} {seq_len:>6} best: {best[0]['tokens_per_s'] / best[1]['tokens_per_s']:5.2f}x "
                             f"tokens/s ({best[0]['precision']} vs {best[1]['precision']}, each at its faster precision)")
    if lines:
        print("\n# longtrain / transformers, same shapes, same batches")
        print("\n".join(lines))


def memory_growth(results: list[dict]) -> dict:
    """(model, precision) -> (MiB per 1k tokens, exponent k) of activation memory against the length, over
    the two longest lengths measured: memory ~ length**k, so k near 1 is linear growth (plus a constant
    part, which pulls k below 1), k near 2 quadratic."""
    growth = {}
    for key in sorted({(r["model"], r["precision"]) for r in results if "error" not in r}):
        points = sorted((r["seq_len"], r["activation_bytes"]) for r in results
                        if "error" not in r and (r["model"], r["precision"]) == key)
        if len(points) < 2:
            continue
        (n0, m0), (n1, m1) = points[-2], points[-1]
        slope = (m1 - m0) / 2**20 / ((n1 - n0) / 1024)
        exponent = math.log(m1 / m0) / math.log(n1 / n0) if m0 > 0 and m1 > 0 else float("nan")
        growth[key] = (slope, exponent, n0, n1)
    return growth


def print_memory_growth(results: list[dict]) -> None:
    growth = memory_growth(results)
    if growth:
        print("\n# activation memory against length, between the two longest lengths (memory ~ length**k)")
        for (model, precision), (slope, exponent, n0, n1) in growth.items():
            print(f"{model:<20} {precision}: {slope:7.1f} MiB per 1k tokens, k = {exponent:4.2f} ({n0} -> {n1} tokens)")


def plot_results(results: list[dict], path: str, peaks: dict) -> str:
    """Tokens/s, MFU and activation memory against the sequence length (log-log), one line per
    (model, precision), peers dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in results if "error" not in r]
    fig, (speed_ax, mfu_ax, memory_ax) = plt.subplots(1, 3, figsize=(17, 5))
    lengths = sorted({r["seq_len"] for r in good})
    for model, precision in sorted({(r["model"], r["precision"]) for r in good}):
        rows = sorted((r for r in good if (r["model"], r["precision"]) == (model, precision)), key=lambda r: r["seq_len"])
        x = [r["seq_len"] for r in rows]
        style = dict(marker="o", linestyle="-" if MODELS[model][0] == "longtrain" else "--", label=f"{model} ({precision})")
        speed_ax.plot(x, [r["tokens_per_s"] for r in rows], **style)
        mfu_ax.plot(x, [100 * r["flops_per_token"] * r["tokens_per_s"] / peaks[precision] for r in rows], **style)
        memory_ax.plot(x, [r["activation_bytes"] / 2**20 for r in rows], **style)
    if good:
        # A line of slope 1 through the smallest memory at the longest length: parallel curves grow linearly.
        top = min((r for r in good if r["seq_len"] == lengths[-1]), key=lambda r: r["activation_bytes"])
        memory_ax.plot(lengths, [top["activation_bytes"] / 2**20 * n / lengths[-1] for n in lengths],
                       color="grey", linestyle=":", label="linear in length (reference)")
    for ax in (speed_ax, mfu_ax, memory_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_xlabel("sequence length (tokens, log scale)")
        ax.grid(True, alpha=0.3)
    speed_ax.set(ylabel="training throughput (tokens / s)", title="Throughput, batch 1")
    mfu_ax.set(ylabel="MFU (% of the measured matmul peak of the precision)", title="Model FLOPs utilization")
    memory_ax.set_yscale("log", base=2)
    memory_ax.set(ylabel="activation memory (MiB, log scale)", title="Memory training adds (peak RSS - setup RSS)")
    speed_ax.legend(fontsize=7)
    memory_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
