"""The ``curate decontam`` command group: eval-set decontamination (:mod:`curate.features.decontam`).

``decontam encode`` encodes the images of local clip_benchmark eval sets with an open_clip model
(``byod score``'s model options) into a named eval set; ``decontam import`` stores eval
embeddings from a file; ``decontam list`` shows the sets; ``decontam build`` computes the
``eval_neighbors`` table (``curate run`` builds it on first use); ``decontam report`` counts, per
task, the samples of the pool or of a subset that have an eval neighbour. Thin wrappers over the
library.
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used, engine_options, progress
from curate.evaluate.tasks import task_dir
from curate.features.decontam import (DEFAULT_THRESHOLD, DecontamError, build_eval_neighbors, encode_eval_set,
                                      import_eval_set, list_eval_sets, report)


@click.group("decontam")
def decontam_group():
    """Eval-set decontamination: find and remove pool samples that are near copies of eval images.

    \b
    Example:
      curate decontam encode catalog.duckdb --name evals --data-dir /data/eval cifar10 imagenet1k \\
          --model ViT-L-14 --checkpoint ViT-L-14-openai.pt
      curate decontam report catalog.duckdb --eval-set evals --threshold 0.95
      curate run decontaminate --set subset=subsets/l14_30pct.npy --set eval_set=evals -o clean.npy
    """


def _resolve(data_dir: Path | None, task: str) -> tuple[str, Path]:
    """(label, directory) of a TASK argument: an existing webdataset directory, else a task key
    under --data-dir (``DATA_DIR/wds_{key}_test``, as `curate eval` finds it)."""
    p = Path(task)
    if p.is_dir():
        name = p.resolve().name
        if name.startswith("wds_") and name.endswith("_test"):
            name = name[len("wds_"):-len("_test")]
        return name, p
    if data_dir is None:
        raise DecontamError(f"{task}: not a directory; give --data-dir to find eval set keys")
    root, _split = task_dir(data_dir, task)
    if not root.is_dir():
        raise DecontamError(f"{task}: {root} not found (eval sets are read from disk, never downloaded)")
    return task, root


@decontam_group.command("encode")
@catalog_option(positional=True)
@click.argument("tasks", nargs=-1, required=True)
@click.option("--name", required=True, help="Name of the eval set (the filter's `eval_set` parameter).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where task keys are found (DATA_DIR/wds_{key}_test, as for `curate eval`).")
@click.option("--model", "arch", default=None, help="open_clip architecture, e.g. ViT-L-14 (as for `byod score`).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Local weights file (never downloaded).")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="open_clip model config JSON for a custom architecture.")
@click.option("--key", default=None, help="Pool npz key compared with (default: l14_img, b32_img for a B/32 model).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an eval set of the same name.")
def encode_cmd(catalog, tasks, name, data_dir, arch, checkpoint, model_config, key, batch_size, device, overwrite):
    """Encode the images of eval sets (TASKS: task keys or webdataset directories) as an eval set.

    The model is loaded and its image embeddings L2-normalised as `curate byod score` does; the
    tars' image members are decoded with PIL (nothing is unpickled).

    \b
    Example:
      curate decontam encode catalog.duckdb --name evals --data-dir /data/eval cifar10 imagenet1k \\
          --model ViT-L-14 --checkpoint ViT-L-14-openai.pt
    """
    resolved = [_resolve(data_dir, t) for t in tasks]
    es = encode_eval_set(catalog, name, resolved, arch, checkpoint, model_config, key=key, batch_size=batch_size,
                         device=device, progress=progress(), overwrite=overwrite)
    tasks_text = ", ".join(f"{t} {n:,}" for t, n in es.meta["tasks"].items())
    click.echo(f"eval set '{es.name}': {es.meta['rows']:,} images x {es.meta['dim']} ({tasks_text}) encoded with "
               f"{es.meta['source']['model']}, compared with pool key {es.meta['key']}; in {es.dir}, "
               f"on catalog {catalog_used(catalog)}")


@decontam_group.command("import")
@catalog_option(positional=True)
@click.option("--name", required=True, help="Name of the eval set (the filter's `eval_set` parameter).")
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Eval image embeddings: .npy, or a .pt/torch.save'd array (read without running code).")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="parquet/csv/tsv with eval_key (and task) per row (default: row numbers).")
@click.option("--task", default=None, help="Task label of every row when --keys has no task column (default: NAME).")
@click.option("--key", default="l14_img", show_default=True, help="Pool npz key the embeddings are compared with.")
@click.option("--model", default=None, help="The model that made the embeddings (recorded).")
@click.option("--overwrite", is_flag=True, help="Replace an eval set of the same name.")
def import_cmd(catalog, name, embeddings, keys_file, task, key, model, overwrite):
    """Import eval image embeddings (rows L2-normalised) from a file as an eval set.

    \b
    Example:
      curate decontam import catalog.duckdb --name evals --embeddings eval_l14.npy --keys eval_keys.parquet
    """
    es = import_eval_set(catalog, name, embeddings, keys_file, task=task, key=key, model=model, overwrite=overwrite)
    click.echo(f"eval set '{es.name}': {es.meta['rows']:,} rows x {es.meta['dim']} from {embeddings.name}, "
               f"compared with pool key {es.meta['key']}; in {es.dir}, on catalog {catalog_used(catalog)}")


@decontam_group.command("list")
@catalog_option(positional=True)
def list_cmd(catalog):
    """List the catalog's eval sets (name, rows, tasks, model).

    \b
    Example:
      curate decontam list catalog.duckdb
    """
    sets = list_eval_sets(catalog)
    for es in sets:
        tasks = ", ".join(f"{t} {n:,}" for t, n in es.meta["tasks"].items())
        click.echo(f"{es.name}: {es.meta['rows']:,} rows x {es.meta['dim']}, key {es.meta['key']}, "
                   f"model {es.meta['source'].get('model')} ({tasks})")
    click.echo(f"{len(sets)} eval set(s) on catalog {catalog_used(catalog)}")


@decontam_group.command("build")
@catalog_option(positional=True)
@click.option("--eval-set", "eval_set", required=True, help="Eval set name (`curate decontam list`).")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Keep pairs with cosine >= this (the table then serves any filter threshold >= it).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per pool file", workers=True)
def build_cmd(catalog, eval_set, threshold, force, engine):
    """Compute the `eval_neighbors` table: every (pool sample, eval image) pair with cosine >= threshold.

    Resumable; registers the view `eval_neighbors` (`curate run` builds it on first use).

    \b
    Example:
      curate decontam build catalog.duckdb --eval-set evals --threshold 0.9
    """
    res = build_eval_neighbors(catalog, eval_set, threshold, progress=progress(), force=force, engine=engine)
    click.echo(f"eval_neighbors[{res.eval_set}]: searched {len(res.computed)} file(s) ({res.rows_computed:,} rows "
               f"against {res.eval_rows:,} eval images, for cosine >= {res.threshold}), {res.files - len(res.computed)} "
               f"already current; in {res.out_dir}")
    click.echo(f"view eval_neighbors registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")


@decontam_group.command("report")
@catalog_option(positional=True)
@click.option("--eval-set", "eval_set", required=True, help="Eval set name (`curate decontam list`).")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="A sample is removed when its image has cosine >= this with some eval image.")
@click.option("--subset", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Count within this subset file (default: the whole pool).")
def report_cmd(catalog, eval_set, threshold, subset):
    """How many samples decontamination removes, per eval task and in all.

    A sample near images of several tasks counts once per task and once in the total.

    \b
    Example:
      curate decontam report catalog.duckdb --eval-set evals --threshold 0.95 --subset subsets/l14_30pct.npy
    """
    r = report(catalog, eval_set, threshold, subset)
    where = str(subset) if subset is not None else "the pool"
    for task, n in r["tasks"].items():
        click.echo(f"{task}: {n:,} removed")
    click.echo(f"decontam[{r['eval_set']}] at cosine >= {r['threshold']}: removed {r['removed']:,} of "
               f"{r['rows']:,} rows of {where}, kept {r['kept']:,}; catalog {catalog_used(catalog)}")
