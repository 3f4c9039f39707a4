"""Training throughput, MFU and peak memory by layer pattern and sequence length, side by side with
same-size `transformers` models (Llama for attention, Mamba for Mamba) trained by a plain PyTorch loop.

    python bench/train_throughput.py                                  # defaults: a few minutes on 2 cores
    python bench/train_throughput.py --seq-lens 1k,2k,4k,8k,16k,32k --steps 3 --timeout 900

Every (model, length) runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own;
`act MiB` is that peak minus the resident memory after the model and optimizer were built, i.e. what
training at that length adds. longtrain trains through its DeepSpeed engine (as `longtrain train`
does); the peers through torch.optim.AdamW with the same settings, on the same seeded token batches
(batch 1). MFU is the longtrain model's FLOPs per token (PaLM appendix convention, see
trainer/metrics.py; a peer of the same size counts the same FLOPs) times tokens/s over the float32
matmul rate measured here before the runs. Timings are the median of the timed steps after one warm-up.

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
    seq_len = spec["seq_len"]
    cfg = model_config(args, pattern)
    from longtrain.trainer.metrics import flops_per_token
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
            loss = F.cross_entropy(engine(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
    else:
        model = build_peer(framework, cfg, seq_len)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def step(batch):
            logits = model(input_ids=batch[:, :-1]).logits.float()
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
        flops = flops_per_token(model, seq_len)  # O blocks: counts the last solve's evaluations
    else:
        reference(tokens[0][:, :8])
        flops = flops_per_token(reference, seq_len)
    seconds = statistics.median(cpu_times[1:])
    return {"model": spec["model"], "seq_len": seq_len, "parameters": count_parameters(model),
            "seconds_per_step": seconds, "tokens_per_s": seq_len / seconds, "flops_per_token": flops,
            "wall_tokens_per_s": seq_len / statistics.median(times[1:]),
            "peak_rss_bytes": rss_bytes(), "activation_bytes": rss_bytes() - setup_rss}


def run_child(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["args"]["threads"]), "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec["model"], "seq_len": spec["seq_len"], "error": f"over {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": spec["model"], "seq_len": spec["seq_len"], "error": tail[:100]}
    return json.loads(lines[-1])


def matmul_peak(threads: int, size: int = 1024, seconds: float = 0.5) -> float:
    """float32 matmul FLOP/s by process CPU time times threads (see the module docstring)."""
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
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
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per (model, length) subprocess")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch
    torch.set_num_threads(args.threads)
    peak = max(matmul_peak(args.threads) for _ in range(4))
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; valid: {', '.join(MODELS)}")
    lengths = parse_lengths(args.seq_lens)
    peer_max = {"llama": parse_lengths(args.llama_max_len)[0], "mamba": parse_lengths(args.hf_mamba_max_len)[0]}
    spec_args = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
    print(f"# measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s by CPU time on {args.threads} thread(s); "
          f"d_model {args.d_model}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, batch 1, torch {torch.__version__}")
    results = []
    header = f"{'model':<20} {'pattern':<7} {'seq':>6} {'params':>9} {'s/step':>8} {'tokens/s':>9} {'MFU %':>6} {'peak MiB':>9} {'act MiB':>8} {'wall tok/s':>10}"
    print(header)
    print("-" * len(header))
    for seq_len in lengths:
        for model in models:
            if MODELS[model][0] != "longtrain" and seq_len > peer_max[MODELS[model][0]]:
                continue
            r = run_child({"model": model, "seq_len": seq_len, "args": spec_args}, args.timeout)
            results.append(r)
            pattern = MODELS[model][1]
            if "error" in r:
                print(f"{model:<20} {pattern:<7} {seq_len:>6} {'':>9} {r['error']}", flush=True)
                continue
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
            print(f"{model:<20} {pattern:<7} {seq_len:>6} {r['parameters']:>9,} {r['seconds_per_step']:>8.3f} "
                  f"{r['tokens_per_s']:>9,.0f} {100 * r['mfu']:>6.1f} {r['peak_rss_bytes'] / 2**20:>9,.0f} "
                  f"{r['activation_bytes'] / 2**20:>8,.0f} {r['wall_tokens_per_s']:>10,.0f}", flush=True)
    print_ratios(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "args": spec_args, "results": results}, f, indent=1)
    return 0


def print_ratios(results: list[dict]) -> None:
    by = {(r["model"], r["seq_len"]): r for r in results if "error" not in r}
    pairs = [("longtrain A", "transformers Llama"), ("longtrain M", "transformers Mamba")]
    lines = []
    for ours, peer in pairs:
        for (model, seq_len), r in sorted(by.items(), key=lambda kv: kv[0][1]):
            if model == ours and (peer, seq_len) in by:
                p = by[(peer, seq_len)]
                lines.append(f"{ours:<12} vs {peer:<19} {seq_len:>6}: {r['tokens_per_s'] / p['tokens_per_s']:5.2f}x tokens/s, "
                             f"activation memory {r['activation_bytes'] / 2**20:,.0f} vs {p['activation_bytes'] / 2**20:,.0f} MiB")
    if lines:
        print("\n# longtrain / transformers, same shapes, same batches")
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
