"""Training throughput with document-aware packing against plain concatenation, side by side.

One training step (forward, backward through the decoder's fused loss, AdamW) on packed sequences of
`--seq-len` tokens holding documents of random lengths (mean `--doc-len`), with `data.packing: documents`
(in-document positions: attention masked per document, rotary positions restarting, Mamba state and conv
resets) and with `concat` (the same tokens, no positions). The two take turns in every round so that a
shared machine's load falls on both alike; a row's time is its fastest step (after one warm-up step),
timed by process CPU time (the rate with the thread on a core of its own).

    python bench/documents.py                                   # 4k tokens, documents of mean 1k, A/M/hybrid
    python bench/documents.py --patterns AFAF --seq-len 8192 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import torch

from longtrain.trainer.config import ModelConfig
from longtrain.trainer.model.decoder import Decoder
from longtrain.trainer.model.layers import Linears


def document_positions(seq: int, mean: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(1, seq) in-document positions of documents with lengths uniform in [mean/4, 7*mean/4]; their count."""
    rows, total, count = [], 0, 0
    while total < seq:
        length = int(torch.randint(mean // 4, 7 * mean // 4 + 1, (), generator=generator))
        length = min(length, seq - total)
        rows.append(torch.arange(length))
        total, count = total + length, count + 1
    return torch.cat(rows)[None], count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", default="AFAF,MMMM,AMMF", help="comma list of layer patterns")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--doc-len", type=int, default=1024, help="mean document length")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per packing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    positions, count = document_positions(args.seq_len, args.doc_len, generator)
    tokens = torch.randint(0, args.vocab, (1, args.seq_len), generator=generator)
    targets = torch.randint(0, args.vocab, (1, args.seq_len), generator=generator)
    print(f"seq {args.seq_len} tokens, {count} documents (mean {args.seq_len / count:.0f} tokens), batch 1, "
          f"d_model {args.d_model}, float32, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'pattern':8} {'concat tok/s':>13} {'documents tok/s':>16} {'documents / concat':>19}")
    for pattern in args.patterns.split(","):
        cfg = ModelConfig(pattern=pattern, d_model=args.d_model, n_heads=4, n_kv_heads=2, vocab_size=args.vocab,
                          ode={"solver": "midpoint", "steps": 2, "sublayer": "attention_mlp"})
        torch.manual_seed(0)
        model = Decoder(cfg, Linears(cfg.init_std))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(pos):
            optimizer.zero_grad(set_to_none=True)
            start = time.process_time()
            model(tokens, targets, pos).backward()
            optimizer.step()
            return time.process_time() - start

        best = {"concat": float("inf"), "documents": float("inf")}
        step(None), step(positions)  # warm-up
        for _ in range(args.repeats):
            for name, pos in (("concat", None), ("documents", positions)):
                best[name] = min(best[name], step(pos))
        rate = {name: args.seq_len / (seconds * args.threads) for name, seconds in best.items()}
        print(f"{pattern:8} {rate['concat']:13.0f} {rate['documents']:16.0f} "
              f"{rate['documents'] / rate['concat']:19.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
