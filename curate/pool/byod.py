"""Score your own downloaded shards with an open_clip model, writing the pool's metadata format.

CommonPool ships, per metadata file, a parquet (uid, url, text, sizes, CLIP similarity scores,
face boxes, sha256) and an ``.npz`` whose row i holds the CLIP embeddings of parquet row i. For
data you downloaded yourself (``curate download --metadata-dir ...``), :func:`score_shards`
produces the same pair for every finished img2dataset shard: ``OUT/SSSSSSSS.parquet`` and
``OUT/SSSSSSSS.npz``. Rows are all the samples img2dataset attempted for that shard, in key
order (like pool rows, which exist whether or not your download of them succeeded), so file rank
equals shard number and the catalog's ``(file, row) -> (shard, key)`` rule holds when the shards
are contiguous from 0. Rows whose image is not in the tar get NULL scores and zero image
embeddings; text embeddings are computed for every row. Columns of the source metadata beyond
the pool's nine (a timestamp, a source id) follow them (:class:`SourceColumns`).
``curate catalog init --metadata OUT`` then works and the same SQL filters run on your data.

The model is an open_clip architecture (a registered name such as ``ViT-B-32``, or a JSON
config file for a custom one) with weights from a local checkpoint file; nothing is fetched from
a hub. Scores fill ``clip_b32_similarity_score`` (and npz ``b32_img``/``b32_txt``) or the l14
ones; the other score column is NULL (not NaN: DuckDB treats NaN as larger than any threshold).
Embeddings are L2-normalised and stored as float16; a score is the float32 dot product of the
normalised image and text embeddings, as in DataComp.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate import resources
from curate.atomic import atomic_path, file_sha256, replace_dir, write_json
from curate.catalog.connection import catalog_meta, connect, init_catalog
from curate.catalog.schema import POOL_SCHEMA, extra_columns
from curate.errors import CurateError
from curate.pool.download import (MANIFEST, SAMPLES_PER_SHARD, STATUS_DIR, DownloadError, check_metadata,
                                  made_by_download, register_status_view, source_metadata_dir)
from curate.progress import Progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EMBEDDINGS = ("b32", "l14")
MODEL_RECORD = ".byod_model.json"  # dot-name: the catalog ignores it in a metadata dir
# what byod score writes in its output dir: only these are ever replaced by --overwrite
_OWNED = re.compile(r"[0-9]{8}\.(?:parquet|npz)|" + re.escape(MODEL_RECORD) + r"|\..+\.tmp")


class ByodError(CurateError):
    """Shards, models or outputs that cannot be scored as given."""


class SourceColumns:
    """The columns of the metadata the shards came from that the pool's nine do not cover
    (a timestamp, a source id...), found for each shard's samples so that the scored metadata
    keeps them.

    Shard S holds rows of one metadata file, by img2dataset's rule the catalog also uses: file f
    starts at shard ``first_shard`` and shard S has its rows from ``(S - first_shard) * 10,000``, at
    most 10,000 of them (:meth:`curate.pool.download.Metadata.rows_of_shard`).
    """

    def __init__(self, metadata_dir: str | os.PathLike):
        try:  # the files, their order and shard numbers exactly as `curate download` saw them
            self.md = check_metadata(metadata_dir, blur=False, verify=False)
        except DownloadError as e:
            raise ByodError(f"source metadata: {e}") from None
        self.fields: list[pa.Field] = []
        for i, f in enumerate(self.md.files):
            schema = pq.read_schema(f.path)
            extra = [schema.field(n) for n in extra_columns(schema.names)]
            if i == 0:
                self.fields = extra
            elif [(x.name, x.type) for x in extra] != [(x.name, x.type) for x in self.fields]:
                raise ByodError(f"{f.path}: extra columns {[f'{x.name} {x.type}' for x in extra]} differ from "
                                f"{self.md.files[0].path.name}'s {[f'{x.name} {x.type}' for x in self.fields]}")
        self.names = [x.name for x in self.fields]

    def for_shard(self, shard: int, keys: list[str], uids: list[str | None], where: str) -> list[pa.Array]:
        """One array per extra column for a shard's samples (img2dataset keys ``S * 10**4 + r``:
        sample r of shard S is row ``(S - first_shard) * 10**4 + r`` of its metadata file). A
        sample whose uid differs from that row's is an error: the metadata is not the one the
        shards were downloaded from."""
        if not self.names:
            return []
        if not keys:  # an empty shard (e.g. a last one of failures only) may have no metadata rows
            return [pa.array([], x.type) for x in self.fields]
        try:
            f, base, src = self.md.rows_of_shard(shard, ["uid", *self.names])
        except DownloadError as e:
            raise ByodError(f"{where}: {e} in the source metadata") from None
        src_uids = src.column("uid").to_pylist()
        rows = []
        for key, uid in zip(keys, uids):
            r = int(key) - shard * SAMPLES_PER_SHARD
            if not 0 <= r < len(src_uids) or src_uids[r] != uid:
                found = src_uids[r] if 0 <= r < len(src_uids) else "no row"
                raise ByodError(f"{where}: sample {key} has uid {uid} but row {base + r} of {f.path} has {found}; "
                                f"pass the metadata these shards were downloaded from")
            rows.append(r)
        idx = pa.array(rows, pa.int64())
        return [src.column(x.name).take(idx).combine_chunks().cast(x.type) for x in self.fields]


def default_embedding(arch: str) -> str:
    """Which pool columns a model's scores fill: b32 for ViT-B-32 variants, l14 otherwise."""
    return "b32" if "B-32" in arch or "b32" in arch.lower() else "l14"


def model_name(arch: str | None, model_config: str | os.PathLike | None = None) -> str:
    """The open_clip name to build for ``--model``/``--model-config``, registering configs as needed.

    Accepted, as ``curate train`` accepts them: an open_clip architecture (``ViT-B-32``); a
    model of this repository's ``train/models/`` (``tiny-vit``) or any directory holding an
    ``open_clip_config.json``, or its ``local-dir:DIR`` name; ``--model-config FILE.json`` in
    open_clip's format (``embed_dim``/``vision_cfg``/``text_cfg``, registered under the file's
    stem) or in the ``open_clip_config.json`` format that wraps it in ``model_cfg``.
    """
    import open_clip  # lazy: optional extra [torch]

    if model_config is not None:
        cfg_path = Path(model_config)
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ByodError(f"{cfg_path}: cannot read the model config as JSON ({e})") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):
            return f"local-dir:{cfg_path.resolve().parent}" if cfg_path.name == "open_clip_config.json" \
                else _register_wrapped(open_clip, cfg_path, cfg["model_cfg"], arch)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ByodError(f"{cfg_path}: model config lacks {', '.join(missing)} (open_clip's model config format)")
        if arch and arch != cfg_path.stem:
            raise ByodError(f"--model {arch}: with --model-config the model is named after the file, {cfg_path.stem!r}")
        open_clip.add_model_config(cfg_path)
        return cfg_path.stem
    if not arch:
        raise ByodError("give --model ARCH (an open_clip model name) or --model-config FILE.json")
    if arch.startswith("local-dir:"):
        d = Path(arch[len("local-dir:"):])
        if not (d / "open_clip_config.json").is_file():
            raise ByodError(f"--model {arch}: {d / 'open_clip_config.json'} not found")
        return f"local-dir:{d.resolve()}"
    for d in (resources.train_dir() / "models" / arch, Path(arch)):
        if (d / "open_clip_config.json").is_file():
            return f"local-dir:{d.resolve()}"
    if arch not in open_clip.list_models():
        raise ByodError(f"--model {arch}: not an open_clip architecture (see open_clip.list_models()), a model "
                        f"of train/models/, or a directory with open_clip_config.json; or pass --model-config FILE.json")
    return arch


def _register_wrapped(open_clip, cfg_path: Path, model_cfg: dict, arch: str | None) -> str:
    """Register the ``model_cfg`` of a wrapped config file under the file's stem."""
    name = cfg_path.stem
    if arch and arch != name:
        raise ByodError(f"--model {arch}: with --model-config the model is named after the file, {name!r}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ByodError(f"{cfg_path}: model_cfg lacks {', '.join(missing)} (open_clip's model config format)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / f"{name}.json"
        tmp.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(tmp)
    return name


def load_model(arch: str | None, checkpoint: str | os.PathLike, model_config: str | os.PathLike | None = None,
               device: str = "cpu"):
    """Build an open_clip model from a local checkpoint; returns (model, preprocess, tokenizer, name).

    The model is named as :func:`model_name` accepts it. open_clip's warning that the model has
    no pretrained weights is not shown: the checkpoint's weights are loaded next.
    """
    import open_clip  # lazy: optional extra [torch]

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ByodError(f"{checkpoint}: checkpoint file not found (byod scoring never downloads weights)")
    arch = model_name(arch, model_config)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "No pretrained weights loaded": ours are loaded just below
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    finally:
        root.setLevel(level)
    try:
        open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)  # no arbitrary unpickling
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        msg = " ".join(str(e).split())[:300]
        raise ByodError(f"{checkpoint}: cannot load as {arch} weights ({type(e).__name__}: {msg})") from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(arch), arch


@dataclass
class ScoreResult:
    out_dir: Path
    shards: int  # shards scored in this call
    skipped: int  # shards whose outputs existed already (resume)
    rows: int
    images: int
    elapsed: float
    files: list[Path]
    carried: list[str] = field(default_factory=list)  # source metadata columns kept after the nine


def _finished_shards(shards_dir: Path) -> list[int]:
    out = []
    for p in shards_dir.glob("*_stats.json"):
        head = p.name.split("_")[0]
        if head.isdigit() and (shards_dir / f"{head}.tar").is_file() and (shards_dir / f"{head}.parquet").is_file():
            out.append(int(head))
    return sorted(out)


def _iter_tar_images(path: Path):
    """(key, image bytes) for each sample in a webdataset tar, streamed member by member."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition("/")[2].partition(".")
                if ext.lower() in IMAGE_EXTS:
                    yield key, tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise ByodError(f"{path}: not a readable tar ({e})") from None


def _encode(model, fn, batch, device):
    import torch  # lazy: optional extra [torch]

    with torch.no_grad():
        x = fn(batch.to(device)).float()
        return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()


def score_shard(shard: int, shards_dir: Path, out_dir: Path, model, preprocess, tokenizer, embedding: str,
                batch_size: int = 256, device: str = "cpu", source: SourceColumns | None = None) -> tuple[int, int]:
    """Score one shard; writes ``OUT/SSSSSSSS.npz`` then ``.parquet``. Returns (rows, images)."""
    import torch  # lazy: optional extra [torch]

    name = f"{shard:08d}"
    meta_path = shards_dir / f"{name}.parquet"
    try:
        meta = pq.read_table(meta_path)
    except Exception as e:  # noqa: BLE001
        raise ByodError(f"{meta_path}: cannot read img2dataset's shard parquet ({e})") from None
    for col in ("uid", "key", "caption", "url"):
        if col not in meta.column_names:
            raise ByodError(f"{meta_path}: missing column '{col}' (download with `curate download`, which saves "
                            f"uid and caption)")
    meta = meta.sort_by("key")
    keys = meta.column("key").to_pylist()
    # before any encoding: a source that does not match these shards fails fast
    extra = source.for_shard(shard, keys, meta.column("uid").to_pylist(), str(meta_path)) if source else []
    row_of = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    captions = ["" if c is None else str(c) for c in meta.column("caption").to_pylist()]

    dim = None
    txt = None
    for s in range(0, n, batch_size):
        e = _encode(model, model.encode_text, tokenizer(captions[s:s + batch_size]), device)
        if txt is None:
            dim = e.shape[1]
            txt = np.zeros((n, dim), np.float32)
        txt[s:s + len(e)] = e
    if txt is None:  # an empty shard
        with torch.no_grad():
            dim = _encode(model, model.encode_text, tokenizer([""]), device).shape[1]
        txt = np.zeros((0, dim), np.float32)
    img = np.zeros((n, dim), np.float32)
    has_img = np.zeros(n, bool)

    def flush(rows, tensors):
        img[rows] = _encode(model, model.encode_image, torch.stack(tensors), device)
        has_img[rows] = True

    rows, tensors = [], []
    for key, data in _iter_tar_images(shards_dir / f"{name}.tar"):
        if key not in row_of:
            raise ByodError(f"{shards_dir / name}.tar: sample {key} is not in {meta_path.name}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                tensors.append(preprocess(im.convert("RGB")))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image
            raise ByodError(f"{shards_dir / name}.tar: sample {key} is not a decodable image ({e})") from None
        rows.append(row_of[key])
        if len(rows) == batch_size:
            flush(rows, tensors)
            rows, tensors = [], []
    if rows:
        flush(rows, tensors)

    score = np.where(has_img, (img * txt).sum(axis=1), np.nan).astype(np.float32)
    score_arr = pa.array(score, pa.float32(), mask=~has_img)  # NULL, not NaN, where no image
    nulls = pa.nulls(n, pa.float32())
    bboxes = (meta.column("face_bboxes").cast(POOL_SCHEMA.field("face_bboxes").type)
              if "face_bboxes" in meta.column_names else pa.array([[]] * n, POOL_SCHEMA.field("face_bboxes").type))

    def col(c, t):
        return meta.column(c).cast(t) if c in meta.column_names else pa.nulls(n, t)

    table = pa.table({
        "uid": col("uid", pa.string()), "url": col("url", pa.string()),
        "text": pa.array(captions, pa.string()),
        "original_width": col("original_width", pa.int64()), "original_height": col("original_height", pa.int64()),
        "clip_b32_similarity_score": score_arr if embedding == "b32" else nulls,
        "clip_l14_similarity_score": score_arr if embedding == "l14" else nulls,
        "face_bboxes": bboxes, "sha256": col("sha256", pa.string()),
    }, schema=POOL_SCHEMA)
    for fld, arr in zip(source.fields if source else [], extra):
        table = table.append_column(fld, arr)
    out_dir.mkdir(parents=True, exist_ok=True)
    # npz first, parquet last: a parquet without its npz never exists, so "parquet present" = done
    with atomic_path(out_dir / f"{name}.npz") as tmp, open(tmp, "wb") as fh:  # a path would get ".npz" appended
        np.savez_compressed(fh, **{f"{embedding}_img": img.astype(np.float16),
                                    f"{embedding}_txt": txt.astype(np.float16)})
    with atomic_path(out_dir / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)
    return n, int(has_img.sum())


def score_shards(shards_dir: str | os.PathLike, out_metadata_dir: str | os.PathLike, model, preprocess, tokenizer,
                 embedding: str = "l14", batch_size: int = 256, device: str = "cpu", progress: bool = True,
                 overwrite: bool = False, metadata_dir: str | os.PathLike | None = None) -> ScoreResult:
    """Score every finished shard in ``shards_dir`` with an already-built open_clip model.

    Resumable: shards whose ``OUT/SSSSSSSS.parquet`` and ``.npz`` exist are skipped (unless
    ``overwrite``). ``preprocess`` is open_clip's eval transform, ``tokenizer`` its tokenizer.
    ``metadata_dir``: the metadata the shards were downloaded from; its columns beyond the
    pool's nine are carried into the output after them (:class:`SourceColumns`).
    """
    t0 = time.perf_counter()
    if embedding not in EMBEDDINGS:
        raise ByodError(f"embedding {embedding!r}: expected one of {', '.join(EMBEDDINGS)}")
    shards_dir, out_dir = Path(shards_dir), Path(out_metadata_dir)
    if not shards_dir.is_dir():
        raise ByodError(f"{shards_dir}: shards directory not found (run `curate download` first)")
    shards = _finished_shards(shards_dir)
    if not shards:
        raise ByodError(f"{shards_dir}: no finished shard (SSSSSSSS.tar + .parquet + _stats.json)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByodError(f"{out_dir}: cannot create ({e.strerror or e})") from None
    was = [s for i, s in enumerate(shards) if s != i]
    if was:
        print(f"warning: shard numbers in {shards_dir} are not contiguous from 0 (first gap before "
              f"{was[0]:08d}); file rank != shard number, so join on uid (download_status), not (file, row)")
    source = SourceColumns(metadata_dir) if metadata_dir is not None else None
    model.eval()
    todo, skipped, files = [], 0, []
    for s in shards:
        p, z = out_dir / f"{s:08d}.parquet", out_dir / f"{s:08d}.npz"
        files.append(p)
        if p.is_file() and z.is_file() and not overwrite:
            skipped += 1
        else:
            todo.append(s)
    rows = images = 0
    for s in Progress(todo, desc="byod score", unit="shard", disable=not progress):
        r, i = score_shard(s, shards_dir, out_dir, model, preprocess, tokenizer, embedding, batch_size, device,
                           source)
        rows += r
        images += i
    return ScoreResult(out_dir, len(todo), skipped, rows, images, time.perf_counter() - t0, files,
                       list(source.names) if source is not None else [])


def score_data_dir(data_dir: str | os.PathLike, arch: str | None, checkpoint: str | os.PathLike,
                   model_config: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                   embedding: str | None = None, batch_size: int = 256, device: str = "cpu",
                   progress: bool = True, overwrite: bool = False,
                   metadata_dir: str | os.PathLike | None = None) -> ScoreResult:
    """``curate byod score``: load the model from files, score ``DATA_DIR/shards`` into ``out``.

    ``out`` defaults to ``DATA_DIR/metadata_scored``. The model and checkpoint used are recorded
    in ``out/.byod_model.json``; resuming with a different model is refused. ``metadata_dir``
    (default: the one `curate download` recorded, else ``DATA_DIR/metadata`` if present) is the
    metadata the shards came from; its columns beyond the pool's nine are kept.
    """
    data_dir = Path(data_dir)
    out_dir = Path(out) if out else data_dir / "metadata_scored"
    if metadata_dir is None:
        metadata_dir = source_metadata_dir(data_dir)
    elif not Path(metadata_dir).is_dir():
        raise ByodError(f"{metadata_dir}: metadata directory not found")
    model, preprocess, tokenizer, name = load_model(arch, checkpoint, model_config, device)
    embedding = embedding or default_embedding(name)
    record = {"model": name, "checkpoint": str(Path(checkpoint).resolve()),
              "checkpoint_sha256": file_sha256(checkpoint), "embedding": embedding,
              "model_config": str(Path(model_config).resolve()) if model_config else None}
    rec_path = out_dir / MODEL_RECORD
    if rec_path.is_file() and not overwrite:
        before = json.loads(rec_path.read_text())
        same = all(before.get(k) == record[k] for k in ("model", "checkpoint_sha256", "embedding"))
        if not same:
            raise ByodError(f"{out_dir}: already scored with {before.get('model')} "
                            f"(checkpoint sha256 {str(before.get('checkpoint_sha256'))[:12]}..., {before.get('embedding')}); "
                            f"use another --out or --overwrite")
    if overwrite:
        # rescoring is built beside the earlier output and replaces it only once every shard is
        # scored: a failed run leaves it as it was; a directory holding files byod did not write
        # is refused
        with replace_dir(out_dir, _OWNED, what="curate byod score", error=ByodError) as build:
            write_json(build / MODEL_RECORD, record)
            res = score_shards(data_dir / "shards", build, model, preprocess, tokenizer, embedding=embedding,
                               batch_size=batch_size, device=device, progress=progress, overwrite=True,
                               metadata_dir=metadata_dir)
        res.out_dir, res.files = out_dir, [out_dir / p.name for p in res.files]
        return res
    # recorded before scoring, so an interrupted run cannot be resumed with another model
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByodError(f"{out_dir}: cannot create ({e.strerror or e})") from None
    write_json(rec_path, record)
    return score_shards(data_dir / "shards", out_dir, model, preprocess, tokenizer, embedding=embedding,
                        batch_size=batch_size, device=device, progress=progress, overwrite=overwrite,
                        metadata_dir=metadata_dir)


def init_scored_catalog(catalog: str | os.PathLike, data_dir: str | os.PathLike, scored_dir: str | os.PathLike,
                        overwrite: bool = False) -> bool:
    """Create ``catalog`` over the scored metadata ``scored_dir`` and ``DATA_DIR/shards``, with
    the ``download_status`` view when `curate download` left status files. Returns whether it did.

    The catalog ``curate download --catalog`` made over this data dir (its pool: the unscored
    ``DATA_DIR/pool_metadata``) is replaced, keeping its features directory: its pool view then
    has the scores. Any other existing file is refused unless ``overwrite``.
    """
    data_dir = Path(data_dir)
    features = None
    if not overwrite and made_by_download(catalog, data_dir):
        con = connect(catalog)
        try:
            features = catalog_meta(con).get("features_dir")
        finally:
            con.close()
        overwrite = True
    init_catalog(catalog, metadata=scored_dir, shards=data_dir / "shards", overwrite=overwrite,
                 features_dir=features)
    status = sorted((data_dir / STATUS_DIR).glob("*.parquet"))
    if status:
        register_status_view(catalog, status, data_dir)
    return bool(status)
