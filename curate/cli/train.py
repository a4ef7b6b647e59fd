"""Command line for fixed training: ``curate train`` (``curate tic train PLAN`` is in :mod:`curate.cli.tic`).

A thin click wrapper over :mod:`curate.train.trainer`; DataComp's underscored flags are spelled with
hyphens here (``--data-dir`` is accepted for ``--data``).
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.train.trainer import TrainSpec, train


@click.command("train")
@click.option("--scale", required=True, help="Scale from train/scales.yaml: debug, small, medium, large, "
              "xlarge, tic_debug, tic_medium, tic_large, tic_xlarge, tiny.")
@click.option("--data", "--data-dir", "data", required=True, metavar="DIR[::DIR...]",
              help="Resharder output dir(s), dirs of such dirs, or .tar files; '::' separates a mixture.")
@click.option("--data-weights", default=None, metavar="W[::W...]",
              help="One weight per --data entry (applied to every shard of that entry, as DataComp).")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints go to OUTPUT_DIR/EXP_NAME/checkpoints; the record to OUTPUT_DIR/EXP_NAME/info.json.")
@click.option("--exp-name", default=None, help="Run name (default: SCALE_scale).")
@click.option("--workers", default=4, show_default=True, help="Data loader workers per process.")
@click.option("--precision", default=None, help="amp, amp_bf16, amp_bfloat16, bf16, fp16, fp32 "
              "(default: the scale's, amp for DataComp scales).")
@click.option("--num-checkpoints", default=5, show_default=True, help="Checkpoints (open_clip epochs) over the run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--accum-freq", default=1, show_default=True)
@click.option("--log-every-n-steps", default=100, show_default=True)
@click.option("--resume", default="latest", show_default=True,
              help="'latest' continues this run after a kill; a checkpoint path resumes from it.")
@click.option("--new-run", is_flag=True, help="TiC warm start: load --resume's weights only; fresh optimizer, "
              "schedule and epoch.")
@click.option("--warmup", type=int, default=None, help="Override the scale's warmup steps (TiC).")
@click.option("--train-num-samples", type=int, default=None, help="Override the scale's samples seen (TiC).")
@click.option("--grad-clip-norm", type=float, default=None)
@click.option("--save-frequency", default=0, show_default=True)
@click.option("--report-to-wandb", is_flag=True)
@click.option("--wandb-project-name", default="datanet", show_default=True)
@click.option("--imagenet-val", default=None, help="ImageNet val folder for open_clip's in-training zero-shot.")
@click.option("--blur-field", default=None, hidden=True)
@click.option("--nproc", type=int, default=None, help="Processes (default: visible GPUs; torchrun when > 1).")
@click.option("--threads", type=int, default=None, help="CPU threads per trainer process (OMP_NUM_THREADS); "
              "1 is much faster on small CPU machines.")
@click.option("--scales-file", default=None, type=click.Path(dir_okay=False), help="Alternative scales YAML.")
@click.option("--quiet", "-q", is_flag=True, help="Do not echo open_clip's log.")
def train_cmd(quiet, **kw):
    """Train a CLIP model with DataComp's fixed settings using open_clip's own trainer.

    \b
    Example:
      curate train --scale tiny --data resharded/clip_score --output-dir runs --exp-name clip_score_s0
      curate train --scale small --data a/::b/ --data-weights 1::2 --output-dir runs --workers 8
    """
    spec = TrainSpec(**kw)
    res = train(spec, echo=None if quiet else (lambda line: click.echo(line, err=True)))
    rec = res.record
    click.echo(f"trained {spec.scale} on {spec.data}: checkpoint {res.checkpoint}")
    click.echo(f"wrote {rec} in {res.elapsed:.1f}s"
               + (f" ({res.samples_available:,} samples available)" if res.samples_available else ""))

