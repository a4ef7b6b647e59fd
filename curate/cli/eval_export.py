"""Command line for building eval sets offline: ``curate eval-export-folder`` (a thin wrapper
over :func:`curate.evaluate.export.export_eval_set`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.evaluate.export import KINDS, export_eval_set
from curate.progress import Progress


@click.command("eval-export-folder")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="What SRC holds (default: classification for a directory, retrieval for a table).")
@click.option("--task", "task", default=None, metavar="KEY",
              help="The task-list key this set is for (e.g. imagenet1k): checked against the task list, "
                   "and OUT must be named as `curate eval` looks for it (DATA_DIR/wds_KEY_test).")
@click.option("--tasks", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Task list YAML for --task (default: eval/tasklist.yml).")
@click.option("--classnames", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names by folder: 'FOLDER NAME' lines (e.g. 'n01440764 tench') or a JSON object "
                   "(default: the folder names).")
@click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt templates, one per line with {c} (default: OpenAI's 80 ImageNet templates).")
@click.option("--image-column", default=None,
              help="Caption table: the image path column (default: the first of image, image_path, filepath, "
                   "file, path).")
@click.option("--caption-column", default=None,
              help="Caption table: the caption column, text or a list of texts (default: the first of caption, "
                   "captions, text). Rows naming the same image give it several captions.")
@click.option("--image-root", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Caption table: the folder relative image paths are under (default: the table's folder).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1),
              help="Samples per tar.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing OUT (refused when OUT is or contains SRC).")
def export_folder_cmd(src, out, kind, task, tasks, classnames, templates, image_column, caption_column,
                      image_root, shard_size, overwrite):
    """Build a zero-shot eval set offline: an ImageFolder directory (one subfolder per class)
    or an image+caption table (csv/tsv/parquet) becomes a clip_benchmark webdataset at OUT
    (test/0.tar.., nshards.txt, classnames.txt, zeroshot_classification_templates.txt,
    dataset_type.txt, count.txt) that `curate eval` and clip_benchmark both read.

    Classes are the sorted folder names (torchvision ImageFolder's order; class id =
    position); a table's rows that name the same image give it several captions. The same
    input writes the same bytes; the output appears only when complete.

    \b
    Example:
      curate eval-export-folder imagenet/val evalsets/wds_imagenet1k_test --task imagenet1k \\
          --classnames imagenet_classnames.txt
      curate eval --train-output-dir runs/small_scale --data-dir evalsets --task imagenet1k
      curate eval-export-folder captions.csv evalsets/wds_mycaps_test --caption-column caption
    """
    t0 = time.perf_counter()
    # a bar at a terminal, log lines elsewhere (curate.progress)
    progress = (lambda it, total=None: Progress(it, total=total, desc="eval-export-folder", unit="img", leave=False))
    res = export_eval_set(src, out, kind=kind, task=task, tasks=tasks, classnames=classnames, templates=templates,
                          image_column=image_column, caption_column=caption_column, image_root=image_root,
                          shard_size=shard_size, overwrite=overwrite, progress=progress)
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    what = (f"{len(res.classes):,} classes, {res.templates} templates" if res.kind == "classification"
            else f"{res.captions:,} captions")
    shards = f"{res.shards} shard{'s' if res.shards != 1 else ''}"
    click.echo(f"wrote {res.samples:,} images ({what}) in {shards} to {res.out} ({time.perf_counter() - t0:.1f}s)")
    name = res.out.name
    key = task or (name[len("wds_"):-len("_test")] if name.startswith("wds_") and name.endswith("_test") else None)
    if key:
        click.echo(f"curate eval: --data-dir {res.out.parent} --task {key}"
                   + ("" if task else " (with a task list naming it: --tasks FILE)"))
    click.echo(f"clip_benchmark: --dataset wds/{key or name} --dataset_root {res.out}"
               + (" --task zeroshot_retrieval" if res.kind == "retrieval" else ""))
