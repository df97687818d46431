"""Time training steps of the published prior configuration (dalle2-pytorch 1.15.6).

Runs ONLY inside benchmarks/.venv-dalle2 (dalle2-pytorch pins open_clip_torch<3, which the
project's own environment cannot hold); bench_prior.py starts it as a subprocess and reads the
JSON line it prints. Standard library + torch + dalle2_pytorch only.

    python _dalle2_step.py --tokens 77 --repeats 3 --warmup 1 --batch 64 --dim 512 --depth 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=77, help="null text tokens (max_text_len)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the published configuration: causal transformer, width 512, depth 12, 77 null text
    # tokens + text embed + time + noisy image embed + learned query = 81 tokens
    net = DiffusionPriorNetwork(
        dim=args.dim, depth=args.depth, dim_head=64, heads=8, num_timesteps=1000,
        max_text_len=args.tokens,
    )
    prior = DiffusionPrior(
        net=net, image_embed_dim=args.dim, timesteps=1000, cond_drop_prob=0.2,
        condition_on_text_encodings=False,
    )
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    cxr = torch.randn(args.batch, args.dim)
    ctpa = torch.randn(args.batch, args.dim)
    times = []
    for i in range(args.warmup + args.repeats):
        t = time.perf_counter()
        loss = prior(text_embed=cxr, image_embed=ctpa)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    print(json.dumps({
        "median_s": statistics.median(times), "times_s": times, "tokens": args.tokens + 4,
        "params": sum(p.numel() for p in net.parameters()), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
