"""Command line for the end-to-end demo: ``curate demo OUT`` (a thin wrapper over :mod:`curate.demo.pipeline`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.cli.options import progress
from curate.demo.pipeline import DemoConfig, run_demo
from curate.progress import Progress


@click.command("demo")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_run"))
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds per filter (comma-separated).")
@click.option("--samples-seen", default=DemoConfig.samples_seen, show_default=True,
              help="Samples seen per training run (fixed).")
@click.option("--scorer-samples-seen", default=DemoConfig.scorer_samples_seen, show_default=True,
              help="Samples seen by the BYOD scorer.")
@click.option("--renders-per-emoji", type=int, default=None,
              help="Pool pairs per emoji (default: samples seen / emoji, i.e. one epoch without a filter, as DataComp sets samples seen = pool size).")
@click.option("--max-emoji", type=int, default=None, help="Use only this many emoji (smoke runs).")
@click.option("--fraction", default=0.3, show_default=True, help="CLIP-score filter: top fraction kept.")
@click.option("--threshold", default=0.5, show_default=True,
              help="CLIP-score threshold filter: keep cosine >= this (the scorer's matched and mismatched "
                   "pairs score ~0.9 and ~0.0).")
@click.option("--workers", default=1, show_default=True, help="Data loader workers per training run.")
@click.option("--verbose", "-v", is_flag=True, help="Echo open_clip's training log.")
def demo_cmd(out, seeds, samples_seen, scorer_samples_seen, renders_per_emoji, max_emoji, fraction, threshold, workers, verbose):
    """End-to-end offline run on real emoji: pool -> BYOD scores -> filters -> reshard -> train -> eval.

    Four filters (none, CLIP score top fraction, CLIP score threshold, DataComp basic) are compared at fixed samples seen over
    several seeds; the table goes to OUT/results.md and OUT/results.json.

    \b
    Example:
      curate demo demo_run --seeds 0,1,2
      curate demo /tmp/smoke --max-emoji 40 --seeds 0 --samples-seen 1024 --scorer-samples-seen 1024
    """
    t0 = time.perf_counter()
    cfg = DemoConfig(out=out, seeds=tuple(int(s) for s in seeds.split(",") if s.strip()),
                     samples_seen=samples_seen, scorer_samples_seen=scorer_samples_seen,
                     renders_per_emoji=renders_per_emoji, max_emoji=max_emoji, fraction=fraction,
                     threshold=threshold, workers=workers)
    res = run_demo(cfg, say=click.echo, echo=(lambda ln: click.echo(ln, err=True)) if verbose else None,
                   progress=Progress if progress() else None)
    click.echo(res.table)
    click.echo(f"wrote {res.out / 'results.md'} and {res.out / 'results.json'} in {time.perf_counter() - t0:.0f}s")
