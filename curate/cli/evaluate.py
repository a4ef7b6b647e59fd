"""Command line for evaluation: ``curate eval`` and ``curate eval-export-winogavil`` (thin
wrappers over :mod:`curate.evaluate.run` and :mod:`curate.evaluate.winogavil`; ``curate tic
matrix`` is in :mod:`curate.cli.tic`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.evaluate.models import PRECISIONS
from curate.evaluate.run import evaluate_run
from curate.evaluate.winogavil import export_winogavil, winogavil_rows_from_hf
from curate.progress import Progress


@click.command("eval")
@click.option("--train-output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A run directory written by `curate train` (holds info.json and checkpoints/).")
@click.option("--tasks", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Task list YAML (default: eval/tasklist.yml, DataComp's 40 tasks).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Root of local eval webdatasets: wds_{task}_test/ dirs, tic/... for TiC tasks.")
@click.option("--output-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where eval_results.jsonl goes (default: the run directory).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--task", "only", multiple=True, help="Only this task key (repeatable).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: as DataComp (float16 autocast on CUDA, fp32 on the CPU); fp32; amp (float16 "
                   "autocast); bf16 (bfloat16 autocast). Recorded in eval_results.jsonl.")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch threads (on small CPU machines 1 is often fastest, as for `curate train`).")
def eval_cmd(train_output_dir, tasks, data_dir, output_dir, batch_size, only, precision, device, threads):
    """Zero-shot evaluation of a trained model; results appended to eval_results.jsonl.

    Tasks already in eval_results.jsonl are skipped; tasks without local data are reported
    as missing.

    \b
    Example:
      curate eval --train-output-dir runs/tiny_scale --data-dir /data/datacomp_eval
    """
    t0 = time.perf_counter()
    # a bar per task at a terminal, log lines elsewhere (curate.progress)
    progress = (lambda it, total=None, desc=None: Progress(it, total=total, desc=desc, unit="sample", leave=False))
    s = evaluate_run(train_output_dir, tasks=tasks, data_dir=data_dir, output_dir=output_dir,
                     batch_size=batch_size, only=list(only) or None, progress=progress,
                     say=lambda m: click.echo(m, err=True), precision=precision, device=device, threads=threads)
    click.echo(s.table())
    counts = {}
    for r in s.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    click.echo(", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
               + f"; results in {s.results_file} ({time.perf_counter() - t0:.1f}s)")


@click.command("eval-export-winogavil")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The --data-dir of `curate eval`; writes wds_misc-winogavil_test/ under it.")
@click.option("--source", required=True, type=click.Path(exists=True, path_type=Path),
              help="A local copy of HF nlphuji/winogavil: a save_to_disk directory, or parquet file(s).")
@click.option("--split", default="test", show_default=True, help="Split to read from a DatasetDict or parquet export.")
@click.option("--shard-size", default=500, show_default=True, help="Instances per tar.")
def export_winogavil_cmd(data_dir, source, split, shard_size):
    """Write WinoGAViL (HF nlphuji/winogavil, the test split DataComp reads) into the local
    webdataset layout `curate eval` reads, from a local copy of the dataset.

    The hub repository is a loading-script dataset: `datasets` runs the repository's Python
    to build it, and `datasets` >= 4 no longer runs such scripts at all. curate never runs it.
    Make the local copy once, where you accept running that script (the dataset is gated: log
    in first), with `datasets` < 4:

    \b
      python -c "import datasets; datasets.load_dataset('nlphuji/winogavil', split='test',
                 trust_remote_code=True).save_to_disk('winogavil_test')"

    The copy is then read as Arrow/parquet data only: no code in it runs.

    \b
    Example:
      curate eval-export-winogavil --data-dir /data/datacomp_eval --source winogavil_test
      curate eval --train-output-dir runs/small_scale --data-dir /data/datacomp_eval --task misc/winogavil
    """
    out = Path(data_dir) / "wds_misc-winogavil_test"
    n = export_winogavil(winogavil_rows_from_hf(source, split), out, shard_size=shard_size)
    click.echo(f"wrote {n:,} WinoGAViL instances to {out}")
