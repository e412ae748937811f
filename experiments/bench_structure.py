"""Monitor construction on a GPT-2-small-sized model (124M parameters, float32): seconds to
build and the growth of the process's peak RSS during construction.

The op graph is captured on one short token sequence; every tensor of that forward pass is
kept alive during capture (and an integer probe per followed value), so the memory is bounded
by the activations of the example input plus the model, not by its parameters × laws.

Run: PYTHONPATH=$PWD python experiments/bench_structure.py [--layers 12] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import transformers

    from torch_conslaw import ConservationMonitor, find_structure

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers)  # n_embd 768, 12 heads, vocab 50257
    model = transformers.GPT2LMHeadModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    with torch.no_grad():
        model(input_ids=ids)  # warm up (lazy imports), so the numbers are the monitor's own
    before = peak_rss_mib()
    start = time.perf_counter()
    structure = find_structure(model, {"input_ids": ids})
    found = time.perf_counter() - start
    mid = peak_rss_mib()
    del structure
    start = time.perf_counter()
    monitor = ConservationMonitor(model, {"input_ids": ids})
    seconds = time.perf_counter() - start
    after = peak_rss_mib()
    laws = sum(g.count for g in monitor.groups)
    print(f"GPT-2 config, {args.layers} layers, {params / 1e6:.1f}M parameters, {args.tokens} tokens")
    print(f"structure (module finder + op graph) found in {found:.2f} s, peak RSS +{mid - before:.0f} MiB")
    print(f"monitor built in {seconds:.2f} s (structure included): {len(monitor.groups)} groups, {laws} laws")
    print(f"peak RSS {before:.0f} MiB before construction, {after:.0f} MiB after (+{after - before:.0f} MiB)")


if __name__ == "__main__":
    main()
