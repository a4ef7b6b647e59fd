"""Eval-set decontamination at pool scale: pool samples whose image is a near copy of an eval image.

DataComp removed near-duplicates of its evaluation images once, when it built CommonPool; this
does it for any pool (a user's own, a BYOD pool) against any local clip_benchmark eval sets.

**Eval sets.** An eval set ``NAME`` lives in ``FEATURES/eval_sets/NAME/``: ``embeddings.npy``
(float32, rows L2-normalised, one per eval image), ``keys.parquet`` (``task, eval_key``: which
eval set and sample each row is) and ``set.json`` (rows, dim, the pool npz ``key`` it is compared
with, sha256, the model or file it came from, rows per task). Two ways to make one:

* :func:`encode_eval_set`: the images of clip_benchmark webdatasets (``DIR/test/*.tar`` or
  ``DIR/*.tar``) encoded with an open_clip model loaded from a local checkpoint exactly as
  ``curate byod score`` loads it (:func:`curate.pool.byod.load_model`), with its normalisation:
  ``encode_image`` of open_clip's eval transform, L2-normalised. Tar members are read as bytes
  and decoded with PIL; nothing is unpickled.
* :func:`import_eval_set`: embeddings from a ``.npy`` (or ``.pt``, read without running pickled
  code: :func:`curate.features.clusters.load_array_file`) plus an optional keys table.

**Which pool embeddings.** The pool's npz key given by the set (``l14_img`` by default for an
L/14 model, ``b32_img`` for a B/32 one: :func:`curate.pool.byod.default_embedding`). For a
DataComp pool that is DataComp's own OpenAI ViT-L/14 embedding, so the eval set must be encoded
with that model; for a BYOD pool it is what ``byod score`` wrote, and a pool whose metadata
directory records (``.byod_model.json``) another checkpoint than the eval set's is refused.

**The producer** ``eval_neighbors(uid, file, "row", eval_set, task, eval_key, sim)``: one row per
(pool sample, eval image) pair with ``sim = <pool image, eval image>`` >= the search threshold.
One task of :func:`curate.engine.map_tasks` per pool file streams the file's embeddings in
batches of :data:`ROWS` against a faiss ``IndexFlatIP`` over the eval rows (``range_search``;
on a CUDA machine a torch matmul, since faiss' GPU flat index has no range search) and writes
``eval_neighbors/{eval_set}/{file}.parquet`` atomically with the settings in its metadata; a
re-run skips current files, so a killed build resumes. A table built at threshold t serves any
filter threshold >= t; a lower one rebuilds. The pool embeddings are used as stored (DataComp's
are unit vectors; ``byod score`` writes unit vectors), so ``sim`` is their cosine.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, file_sha256, replace_dir, write_json
from curate.catalog.connection import connect, default_catalog
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.clusters import load_array_file
from curate.features.embeddings import EmbeddingError, EmbeddingFile, check_key, iter_batches, pool_embedding_files
from curate.features.tables import (NamedSet, SetPlan, check_set_name, feature_root, find_named_set, list_named_sets,
                                    npz_identity, register_file_tables)
from curate.progress import Progress

VIEW = "eval_neighbors"
META_KEY = b"curate.eval_neighbors"
SCHEMA_VERSION = 1
#: pool rows per faiss search
ROWS = 8192
#: eval rows per block of the torch (CUDA) path
EVAL_BLOCK = 16384
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
DEFAULT_THRESHOLD = 0.95
_OWNED = re.compile(r"embeddings\.npy|keys\.parquet|set\.json|\..+\.tmp")
BYOD_MODEL_RECORD = ".byod_model.json"  # curate.pool.byod.MODEL_RECORD

OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("eval_set", pa.string()), ("task", pa.string()), ("eval_key", pa.string()),
                           ("sim", pa.float32())])
KEYS_SCHEMA = pa.schema([("task", pa.string()), ("eval_key", pa.string())])


class DecontamError(CurateError):
    """An eval set, eval embedding file or pool that decontamination cannot use."""


# -- eval sets ------------------------------------------------------------------------------

class EvalSet(NamedSet):
    """Encoded eval images: ``FEATURES_DIR/eval_sets/NAME/`` with ``keys.parquet`` (task, eval_key)."""

    def keys(self) -> pa.Table:
        return pq.read_table(self.dir / "keys.parquet")


def check_name(name) -> str:
    return check_set_name(name, "eval set", DecontamError)


def eval_sets_root(catalog) -> Path:
    return feature_root(catalog, "eval_sets")


def list_eval_sets(catalog=None) -> list[EvalSet]:
    return list_named_sets(catalog, "eval_sets", EvalSet)


def get_eval_set(catalog, name) -> EvalSet:
    return find_named_set(catalog, "eval_sets", name, EvalSet, "eval set", DecontamError,
                          "make it with `curate decontam encode` or `curate decontam import`")


def normalise_rows(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise DecontamError(f"{where}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros (cannot be normalised)")
    return (x / norms[:, None]).astype(np.float32)


def _save_set(catalog, name: str, x: np.ndarray, tasks: list[str], keys: list[str], key: str, source: dict,
              overwrite: bool) -> EvalSet:
    set_dir = eval_sets_root(catalog) / name
    if (set_dir / "set.json").exists() and not overwrite:
        raise DecontamError(f"eval set '{name}' already exists in {catalog} (use --overwrite to replace it)")
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t] = counts.get(t, 0) + 1
    with replace_dir(set_dir, _OWNED, what=f"curate decontam (eval set '{name}')", error=DecontamError) as new:
        with atomic_path(new / "embeddings.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(x, np.float32), allow_pickle=False)
        with atomic_path(new / "keys.parquet", suffix=".parquet") as tmp:
            pq.write_table(pa.table({"task": pa.array(tasks, pa.string()), "eval_key": pa.array(keys, pa.string())},
                                    schema=KEYS_SCHEMA), tmp)
        meta = {"name": name, "rows": int(len(x)), "dim": int(x.shape[1]), "key": key, "normalised": "L2 rows",
                "sha256": file_sha256(new / "embeddings.npy"), "keys_sha256": file_sha256(new / "keys.parquet"),
                "tasks": counts, "source": source,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(new / "set.json", meta)
    return EvalSet(name, set_dir, meta)


def eval_shards(directory) -> list[Path]:
    """The tars of a clip_benchmark webdataset directory: ``DIR/test/`` (``nshards.txt`` order,
    else numeric order) or the tars directly in ``DIR``."""
    d = Path(directory)
    for sdir in (d / "test", d):
        nfile = sdir / "nshards.txt"
        if nfile.is_file():
            try:
                n = int(nfile.read_text().strip())
            except ValueError:
                raise DecontamError(f"{nfile}: not an integer") from None
            shards = [sdir / f"{i}.tar" for i in range(n)]
            gone = [s for s in shards if not s.is_file()]
            if gone:
                raise DecontamError(f"{gone[0]}: missing ({n} shards per {nfile})")
            return shards
        tars = sorted(sdir.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
        if tars:
            return tars
    raise DecontamError(f"{d}: no webdataset tars (expected {d}/test/*.tar or {d}/*.tar)")


def iter_eval_images(shards):
    """(key, image bytes, where) of every sample of webdataset tars, in order; one image per key
    (the first of webp/png/jpg/jpeg); a sample without an image is an error."""
    for shard in shards:
        current, seen = None, False

        def done():
            if current is not None and not seen:
                raise DecontamError(f"{shard}: sample {current} has no image member")

        try:
            with tarfile.open(shard, "r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    if key != current:
                        done()
                        current, seen = key, False
                    if ext.lower() in IMAGE_EXTS and not seen:
                        seen = True
                        yield key, tf.extractfile(m).read(), f"{shard}: sample {key}"
        except tarfile.TarError as e:
            raise DecontamError(f"{shard}: not a readable tar ({e})") from None
        done()


def encode_eval_set(catalog, name: str, tasks, arch: str | None, checkpoint, model_config=None,
                    key: str | None = None, batch_size: int = 64, device: str = "cpu", progress: bool = True,
                    overwrite: bool = False) -> EvalSet:
    """Encode the images of eval sets ``tasks`` (``[(task label, webdataset dir), ...]``) with an
    open_clip model from a local checkpoint (as ``byod score`` loads and normalises it) and store
    them as eval set ``name``, compared with the pool's npz ``key`` (default from the model:
    ``l14_img``, or ``b32_img`` for a B/32)."""
    import torch  # lazy: optional extra [torch]
    from PIL import Image  # lazy: only encoding decodes images

    from curate.pool.byod import default_embedding, load_model  # lazy: open_clip loading, encoding only

    catalog = Path(catalog) if catalog else default_catalog()
    check_name(name)
    tasks = [(str(t), Path(d)) for t, d in tasks]
    if not tasks:
        raise DecontamError("no eval set given (task keys or webdataset directories)")
    if (eval_sets_root(catalog) / name / "set.json").exists() and not overwrite:
        raise DecontamError(f"eval set '{name}' already exists in {catalog} (use --overwrite to replace it)")
    shards = [(t, eval_shards(d)) for t, d in tasks]  # every input checked before the model loads
    model, preprocess, _tok, model_id = load_model(arch, checkpoint, model_config, device)
    key = check_key(key or f"{default_embedding(model_id)}_img")
    parts, labels, keys = [], [], []
    bar = Progress(desc=f"decontam encode {name}", unit="image", disable=not progress)  # total: unknown without a scan
    try:
        for task, task_shards in shards:
            batch = []

            def flush():
                with torch.no_grad():
                    x = model.encode_image(torch.stack(batch).to(device)).float()
                    parts.append(torch.nn.functional.normalize(x, dim=-1).cpu().numpy())
                bar.update(len(batch))
                batch.clear()

            for k, data, where in iter_eval_images(task_shards):
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        batch.append(preprocess(im.convert("RGB")))
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image
                    raise DecontamError(f"{where}: not a decodable image ({e})") from None
                labels.append(task)
                keys.append(k)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
    finally:
        bar.close()
    if not parts:
        raise DecontamError(f"eval sets {', '.join(t for t, _ in tasks)}: no images")
    x = np.concatenate(parts)
    source = {"kind": "encoded", "model": model_id, "checkpoint": str(Path(checkpoint).resolve()),
              "checkpoint_sha256": file_sha256(checkpoint),
              "model_config": str(Path(model_config).resolve()) if model_config else None,
              "eval_dirs": {t: str(d.resolve()) for t, d in tasks}}
    return _save_set(catalog, name, x, labels, keys, key, source, overwrite)


def _read_keys(path: Path, rows: int, default_task: str) -> tuple[list[str], list[str]]:
    """(task, eval_key) per row from a parquet/csv/tsv with columns ``task`` (optional) and
    ``eval_key`` (or ``key``)."""
    import pyarrow.csv as pcsv  # lazy: only an imported keys table in csv form needs it

    try:
        if path.suffix.lower() == ".parquet":
            t = pq.read_table(path)
        else:
            opts = pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            t = pcsv.read_csv(path, parse_options=opts,
                              convert_options=pcsv.ConvertOptions(column_types={"task": pa.string(),
                                                                                "eval_key": pa.string(),
                                                                                "key": pa.string()}))
    except (OSError, pa.ArrowException) as e:
        raise DecontamError(f"{path}: cannot read the keys table ({str(e).splitlines()[0]})") from None
    col = "eval_key" if "eval_key" in t.column_names else "key" if "key" in t.column_names else None
    if col is None:
        raise DecontamError(f"{path}: the keys table needs an 'eval_key' column (and optionally 'task'); "
                            f"has {', '.join(t.column_names)}")
    if t.num_rows != rows:
        raise DecontamError(f"{path}: {t.num_rows} keys for {rows} embedding rows")
    keys = [None if v is None else str(v) for v in t.column(col).to_pylist()]
    tasks = ([None if v is None else str(v) for v in t.column("task").to_pylist()]
             if "task" in t.column_names else [default_task] * rows)
    for i, (a, b) in enumerate(zip(tasks, keys)):
        if a is None or b is None:
            raise DecontamError(f"{path}: row {i}: {'task' if a is None else col} is empty")
    return tasks, keys


def import_eval_set(catalog, name: str, embeddings, keys_file=None, task: str | None = None,
                    key: str = "l14_img", model: str | None = None, overwrite: bool = False) -> EvalSet:
    """Store eval image embeddings from a file (``.npy``; ``.pt``/pickles only through the
    restricted loaders) as eval set ``name``, rows L2-normalised. Keys: a table with ``eval_key``
    (and ``task``) per row, else the row number, with task ``task`` (default: the set name)."""
    catalog = Path(catalog) if catalog else default_catalog()
    check_name(name)
    check_key(key)
    path = Path(embeddings)
    try:
        x = load_array_file(path, "eval embeddings", key="image_features")
    except CurateError as e:
        raise DecontamError(str(e)) from None
    x = normalise_rows(x, str(path))
    task = task or name
    if keys_file is not None:
        tasks, keys = _read_keys(Path(keys_file), len(x), task)
    else:
        tasks, keys = [task] * len(x), [str(i) for i in range(len(x))]
    source = {"kind": "imported", "model": model, "path": str(path.resolve()), "sha256": file_sha256(path),
              "keys": str(Path(keys_file).resolve()) if keys_file is not None else None}
    return _save_set(catalog, name, x, tasks, keys, key, source, overwrite)


# -- the search ----------------------------------------------------------------------------

def _cuda() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


class NeighborSearch:
    """Every (query row, eval row) pair with inner product >= ``threshold``.

    faiss ``IndexFlatIP.range_search`` on CPU (it keeps scores strictly above its radius: the
    radius is the next float32 below the threshold and the pairs are then checked against the
    threshold in float64, as the filter compares them); a torch matmul on a CUDA device."""

    def __init__(self, eval_embeddings: np.ndarray, threshold: float, gpu: bool | None = None,
                 torch_device: str | None = None):
        """``gpu``: None = a CUDA device when present; ``torch_device`` forces the torch path on
        that device (``"cpu"`` lets a machine without a GPU check the GPU path's maths)."""
        self.e = np.ascontiguousarray(eval_embeddings, np.float32)
        self.threshold = float(threshold)
        self.torch = None
        if gpu is None:
            gpu = _cuda()
        if gpu or torch_device:
            try:
                import torch  # lazy: optional extra [torch], only on machines with an NVIDIA device
                if torch_device or torch.cuda.is_available():
                    self.torch, self.device = torch, torch_device or "cuda"
                    self.eg = torch.from_numpy(self.e).to(self.device)
            except ImportError:
                pass
        if self.torch is None:
            import faiss  # lazy: optional extra [faiss]; only the search needs it

            self.index = faiss.IndexFlatIP(self.e.shape[1])
            self.index.add(self.e)
            self.radius = float(np.nextafter(np.float32(self.threshold), np.float32(-np.inf)))

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, eval row, sim float32) sorted by query row then eval row."""
        x = np.ascontiguousarray(x, np.float32)
        if self.torch is not None:
            q, e, s = self._search_torch(x)
        else:
            lims, d, idx = self.index.range_search(x, self.radius)
            q = np.repeat(np.arange(len(x), dtype=np.int64), np.diff(lims).astype(np.int64))
            e, s = idx.astype(np.int64), d.astype(np.float32)
        keep = s.astype(np.float64) >= self.threshold
        q, e, s = q[keep], e[keep], s[keep]
        order = np.lexsort((e, q))
        return q[order], e[order], s[order]

    def _search_torch(self, x):
        torch = self.torch
        qs, es, ss = [], [], []
        with torch.no_grad():
            xg = torch.from_numpy(x).to(self.device)
            for j in range(0, len(self.e), EVAL_BLOCK):
                s = xg @ self.eg[j:j + EVAL_BLOCK].T
                qi, ei = torch.nonzero(s >= self.threshold, as_tuple=True)
                qs.append(qi.cpu().numpy())
                es.append(ei.cpu().numpy() + j)
                ss.append(s[qi, ei].float().cpu().numpy())
        return (np.concatenate(qs).astype(np.int64), np.concatenate(es).astype(np.int64),
                np.concatenate(ss).astype(np.float32))


# -- the producer --------------------------------------------------------------------------

def _check_byod_model(files: list[EmbeddingFile], es: EvalSet) -> None:
    """A pool scored by ``byod score`` with another checkpoint than the eval set's is refused."""
    want = es.meta.get("source", {}).get("checkpoint_sha256")
    for d in sorted({ef.npz.parent for ef in files if ef.npz is not None}):
        rec = d / BYOD_MODEL_RECORD
        if not rec.is_file():
            continue
        try:
            got = json.loads(rec.read_text())
        except ValueError:
            continue
        if got.get("embedding") and f"{got['embedding']}_img" != es.meta["key"]:
            raise DecontamError(f"{rec}: the pool holds '{got['embedding']}_img' embeddings, eval set '{es.name}' "
                                f"is compared with '{es.meta['key']}'")
        if want and got.get("checkpoint_sha256") and got["checkpoint_sha256"] != want:
            raise DecontamError(f"{rec}: the pool was scored with {got.get('model')} (checkpoint sha256 "
                                f"{got['checkpoint_sha256'][:12]}...), eval set '{es.name}' was encoded with "
                                f"{es.meta['source'].get('model')} (sha256 {want[:12]}...); encode it with the "
                                f"pool's model")


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise DecontamError(f"threshold {threshold!r}: expected a number in [-1, 1]") from None
    if not -1.0 <= t <= 1.0:
        raise DecontamError(f"threshold {threshold!r}: expected a number in [-1, 1] (a cosine similarity)")
    return t


def plan(catalog, eval_set: str, threshold: float, force: bool = False) -> SetPlan:
    """What is built and what is missing. A file is current when it was built from the same eval
    set and pool npz at a search threshold <= ``threshold``."""
    catalog = Path(catalog) if catalog else default_catalog()
    threshold = check_threshold(threshold)
    es = get_eval_set(catalog, eval_set)
    settings = {"schema": SCHEMA_VERSION, "key": es.meta["key"], "eval_set": es.name, "eval_sha256": es.meta["sha256"],
                "keys_sha256": es.meta["keys_sha256"], "eval_rows": es.meta["rows"], "threshold": threshold}
    files = pool_embedding_files(catalog, es.meta["key"])
    needed = f"key '{es.meta['key']}' needed for eval_neighbors"
    sources = {ef.file: npz_identity(ef, needed, DecontamError) for ef in files}
    same = ("schema", "key", "eval_set", "eval_sha256", "keys_sha256", "eval_rows")
    return SetPlan(es.name, settings, feature_root(catalog, VIEW) / es.name, files, sources).find_stale(
        META_KEY, force, lambda got: (all(got.get(k) == settings[k] for k in same)
                                      and isinstance(got.get("threshold"), float) and got["threshold"] <= threshold))


def _file_task(catalog: str, eval_set: str, ef: EmbeddingFile, out: str, settings: dict, source: dict) -> int:
    """The eval neighbours of one pool file -> ``out`` (parquet, atomic); returns the pool rows read."""
    es = get_eval_set(catalog, eval_set)
    if es.meta["sha256"] != settings["eval_sha256"]:
        raise DecontamError(f"eval set '{eval_set}' changed during the build; run it again")
    e = es.embeddings(mmap=False)
    keys = es.keys()
    search = NeighborSearch(e, settings["threshold"])
    qs, eis, ss = [], [], []
    pos = 0
    key = settings["key"]
    try:  # the eval set's width, not DataComp's documented one: a BYOD pool's model may be any size
        for batch in iter_batches(ef, key, batch_rows=ROWS, dim=e.shape[1]):
            q, ei, s = search.search(batch)
            qs.append(q + pos)
            eis.append(ei)
            ss.append(s)
            pos += len(batch)
    except EmbeddingError as err:
        raise DecontamError(f"{err} (the width of eval set '{eval_set}': encode it with the pool's model)") from None
    q = np.concatenate(qs) if qs else np.zeros(0, np.int64)
    ei = np.concatenate(eis) if eis else np.zeros(0, np.int64)
    s = np.concatenate(ss) if ss else np.zeros(0, np.float32)
    con = connect(catalog)
    try:
        uids = con.execute('SELECT uid FROM pool WHERE file = ? ORDER BY "row"', [ef.file]).to_arrow_table()
    finally:
        con.close()
    uid = uids.column("uid").combine_chunks().cast(pa.string())
    if len(uid) != ef.num_rows:
        raise DecontamError(f"pool file {ef.file}: read {len(uid)} uids, expected {ef.num_rows}")
    idx = pa.array(ei, pa.int64())
    n = len(q)
    meta = {"file": ef.file, "rows": ef.num_rows, "pairs": n, "settings": settings, "source": source}
    table = pa.table({"uid": uid.take(pa.array(q, pa.int64())), "file": pa.array([ef.file] * n, pa.string()),
                      "row": pa.array(q, pa.int64()), "eval_set": pa.array([eval_set] * n, pa.string()),
                      "task": keys.column("task").take(idx).combine_chunks(),
                      "eval_key": keys.column("eval_key").take(idx).combine_chunks(),
                      "sim": pa.array(s, pa.float32())},
                     schema=OUTPUT_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()}))
    with atomic_path(Path(out), suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return ef.num_rows


def _register(catalog: Path) -> None:
    register_file_tables(catalog, VIEW, feature_root(catalog, VIEW), [es.name for es in list_eval_sets(catalog)],
                         'uid, file, "row", eval_set, task, eval_key, sim')


@dataclass
class BuildResult:
    eval_set: str
    threshold: float
    files: int = 0
    computed: list[str] = field(default_factory=list)
    rows_computed: int = 0
    rows_total: int = 0
    eval_rows: int = 0
    out_dir: Path | None = None
    elapsed: float = 0.0


def build_eval_neighbors(catalog=None, eval_set: str = "", threshold: float = DEFAULT_THRESHOLD,
                         progress: bool = True, force: bool = False, engine: Engine | None = None) -> BuildResult:
    """The eval neighbours of every pool file lacking a current table; register the view."""
    t0 = time.perf_counter()
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    p = plan(catalog, eval_set, threshold, force)
    _check_byod_model(p.files, get_eval_set(catalog, eval_set))
    res = BuildResult(p.name, p.settings["threshold"], files=len(p.files),
                      rows_total=sum(f.num_rows for f in p.files), eval_rows=p.settings["eval_rows"],
                      out_dir=p.out_dir)
    tasks = [(str(catalog), p.name, ef, str(p.output(ef)), p.settings, p.sources[ef.file]) for ef in p.todo]
    for ef, rows in zip(p.todo, map_tasks(_file_task, tasks, engine, desc=f"eval_neighbors {p.name}",
                                          progress=progress, unit="row", sizes=[ef.num_rows for ef in p.todo],
                                          start="spawn")):
        res.computed.append(ef.file)
        res.rows_computed += rows
    _register(catalog)
    res.elapsed = time.perf_counter() - t0
    return res


def report(catalog, eval_set: str, threshold: float = DEFAULT_THRESHOLD, subset=None) -> dict:
    """Per task: how many samples (of ``subset``'s rows when given, else of the pool) have an eval
    neighbour with ``sim >= threshold``; and how many in all (a sample near several tasks' images
    counts once in the total). Builds the table first if it is not current."""
    from curate.subset import subset_to_arrow  # lazy: only a report on a subset reads one

    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    threshold = check_threshold(threshold)
    if plan(catalog, eval_set, threshold).todo:
        build_eval_neighbors(catalog, eval_set, threshold, progress=False)
    es = get_eval_set(catalog, eval_set)
    con = connect(catalog, read_only=True)
    try:
        if subset is not None:
            con.register("__decontam_subset", subset_to_arrow(subset))
            base = "SELECT uid FROM __decontam_subset"
        else:
            base = "SELECT uid FROM pool"
        near = ("SELECT DISTINCT uid, task FROM eval_neighbors WHERE eval_set = ? AND sim::DOUBLE >= ?")
        per_task = dict(con.execute(
            f"SELECT n.task, count(*) FROM ({base}) AS b JOIN ({near}) AS n ON n.uid = b.uid "
            f"GROUP BY n.task ORDER BY n.task", [es.name, threshold]).fetchall())
        total, removed = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE b.uid IN (SELECT uid FROM ({near}))) FROM ({base}) AS b",
            [es.name, threshold]).fetchone()
    finally:
        con.close()
    return {"eval_set": es.name, "threshold": threshold, "rows": int(total), "removed": int(removed),
            "kept": int(total - removed), "tasks": {t: int(per_task.get(t, 0)) for t in sorted(es.meta["tasks"])}}


class _Producer:
    """``eval_neighbors`` for the eval set and threshold of the filter's ``eval_set`` and
    ``threshold`` parameters."""

    view = VIEW

    def _args(self, params) -> tuple[str, float]:
        if not params or "eval_set" not in params:
            raise DecontamError("a filter reading eval_neighbors must declare `SET VARIABLE eval_set = 'NAME';`")
        return check_name(params["eval_set"]), check_threshold(params.get("threshold", DEFAULT_THRESHOLD))

    def is_current(self, catalog, params) -> bool:
        catalog = (Path(catalog) if catalog else default_catalog()).resolve()
        name, threshold = self._args(params)
        p = plan(catalog, name, threshold)
        if p.todo:
            return False
        con = connect(catalog)
        try:
            row = con.execute("SELECT paths FROM curate_views WHERE name = ?", [VIEW]).fetchone()
        finally:
            con.close()
        registered = {str((catalog.parent / q).resolve()) for q in (row[0] if row else [])}
        return all(str(p.output(ef).resolve()) in registered for ef in p.files)

    def build(self, catalog, params, progress: bool = True) -> None:
        name, threshold = self._args(params)
        res = build_eval_neighbors(catalog, name, threshold, progress=progress)
        if progress:
            print(f"eval_neighbors[{res.eval_set}]: searched {len(res.computed)} file(s) ({res.rows_computed:,} rows) "
                  f"against {res.eval_rows:,} eval images at cosine >= {res.threshold}, in {res.elapsed:.1f}s",
                  file=sys.stderr, flush=True)

    def describe(self, catalog, params) -> dict:
        es = get_eval_set(catalog, self._args(params)[0])
        return {"eval_set": es.name, "rows": es.meta["rows"], "key": es.meta["key"], "sha256": es.meta["sha256"]}


PRODUCER = _Producer()
