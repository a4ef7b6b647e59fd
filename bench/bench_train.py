"""Training-side speed on CPU: the tiny CLIP's train step with 1 thread vs torch's default, and
zero-shot evaluation encoding speed (images/s, each image encoded once).

Prints figures measured in one run; the ratios are what docs/training.md quotes. Runs in
about a minute on 2 cores.

    python bench/bench_train.py [--steps 8] [--batch 64]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch


def step_rate(model, opt, batch: int, steps: int, threads: int, checkpointing: bool) -> float:
    torch.set_num_threads(threads)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(0, 49407, (batch, 32))
    for i in range(steps + 1):
        if i == 1:  # the first step warms up allocators
            t0 = time.perf_counter()
        f_img, f_txt, scale = model(x, t)[:3]
        logits = scale * f_img @ f_txt.T
        labels = torch.arange(batch)
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    import open_clip

    from curate.train.trainer import resolve_model

    name = resolve_model("tiny-vit")
    model = open_clip.create_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    default_threads = torch.get_num_threads()
    rows = []
    for ck in (True, False):
        one = step_rate(model, opt, a.batch, a.steps, 1, ck)
        dflt = step_rate(model, opt, a.batch, a.steps, default_threads, ck)
        rows.append((ck, one, dflt))
        print(f"train step, grad checkpointing {ck!s:5}: 1 thread {one:7.1f} samples/s, "
              f"{default_threads} threads (torch default) {dflt:7.1f} samples/s, ratio {one / dflt:5.2f}x")
    # evaluation: encode images once (no grad), 1 thread
    torch.set_num_threads(1)
    model.eval()
    x = torch.randn(256, 3, 32, 32)
    with torch.no_grad():
        model.encode_image(x[:8])
        t0 = time.perf_counter()
        for _ in range(4):
            model.encode_image(x)
        ips = 4 * 256 / (time.perf_counter() - t0)
    print(f"eval image encoding (bound, no decode): {ips:.0f} images/s on 1 thread")


if __name__ == "__main__":
    main()
