"""WinoGAViL (DataComp's ``misc/winogavil`` task): instances on disk, their export, the task.

DataComp reads WinoGAViL from the HF hub (nlphuji/winogavil, test split: cue, candidates,
associations, candidate_images). Here it is a webdataset like every other task, in
``{data_dir}/wds_misc-winogavil_test/test/*.tar``, one sample per instance: ``KEY.json``
``{"cue", "candidates", "associations"}`` and one image per candidate, ``KEY.0.png``,
``KEY.1.png``, ... in candidate order; ``dataset_type.txt`` says "winogavil".
:func:`export_winogavil` writes that layout from the HF rows (``curate eval-export-winogavil``),
read from a local copy of the dataset as data (:func:`winogavil_rows_from_hf`): the hub
repository is a loading-script dataset, and running its script would run the repository's
code. :func:`run_winogavil` scores it as DataComp's ``wino_eval.py`` does
(:func:`curate.evaluate.metrics.winogavil_metrics`).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.atomic import replace_dir
from curate.evaluate import EvalError
from curate.evaluate.metrics import winogavil_metrics
from curate.evaluate.models import LoadedModel, encode_texts, normalize
from curate.evaluate.tasks import TaskData

WINOGAVIL_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
WINOGAVIL_FIELDS = ("cue", "candidates", "associations", "candidate_images")


def iter_winogavil(shards: list[str]):
    """(key, cue, candidates, associations, [PIL image per candidate]) per instance."""
    import webdataset as wds  # lazy: webdataset imports torch; only reading instances needs it

    pipe = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    for s in pipe:
        where = f"{s.get('__url__')}: sample {s.get('__key__')}"
        if "json" not in s:
            raise EvalError(f"{where} has no json member")
        try:
            inst = json.loads(s["json"])
        except ValueError:
            raise EvalError(f"{where}: json member is not JSON") from None
        cue, cands, assoc = (inst.get(k) if isinstance(inst, dict) else None
                             for k in ("cue", "candidates", "associations"))
        if not (isinstance(cue, str) and cue.strip() and isinstance(cands, list) and cands
                and isinstance(assoc, list) and all(isinstance(c, str) for c in cands + assoc)):
            raise EvalError(f"{where}: json needs a non-empty cue and lists of candidate and association names")
        images = []
        for i in range(len(cands)):
            ext = next((f"{i}.{e}" for e in WINOGAVIL_IMAGE_EXTS if f"{i}.{e}" in s), None)
            if ext is None:
                raise EvalError(f"{where}: no image for candidate {i} ({cands[i]!r})")
            try:
                images.append(Image.open(io.BytesIO(s[ext])).convert("RGB"))
            except OSError as e:
                raise EvalError(f"{where}: undecodable {ext} ({e})") from None
        yield s["__key__"], cue, cands, assoc, images


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a cue: lower-cased, "An ..." before a vowel letter, else "A ..."."""
    item = cue.lower()
    return f"An {item}" if item[:1] in ("a", "e", "i", "o", "u") else f"A {item}"


def run_winogavil(m: LoadedModel, data: TaskData, batch_size: int = 64, progress=None) -> dict:
    """DataComp's wino_eval: score each candidate image against the cue's prompt, pick the top
    n = |associations| (see :func:`curate.evaluate.metrics.jaccard_top_n`), Jaccard with the truth. Each image is
    encoded once; images/s counts candidate images."""
    import torch  # lazy: optional extra [torch]

    feats, batch, spans, prompts, truths = [], [], [], [], []
    t0 = time.perf_counter()

    def flush():
        with torch.no_grad():
            feats.append(normalize(m.model.encode_image(torch.stack(batch)).float().numpy()))
        batch.clear()

    n_images = 0
    it = iter_winogavil(data.shards)
    if progress is not None:
        it = progress(it, total=data.count)
    for _, cue, cands, assoc, images in it:
        spans.append((n_images, n_images + len(images)))
        n_images += len(images)
        prompts.append(winogavil_prompt(cue))
        truths.append(np.isin(cands, assoc))
        for img in images:
            batch.append(m.preprocess(img))
            if len(batch) >= batch_size:
                flush()
    if batch:
        flush()
    if not spans:
        raise EvalError(f"{data.root}: no samples")
    img = np.concatenate(feats)
    txt = normalize(encode_texts(m, prompts))
    secs = time.perf_counter() - t0
    instances = [(img[a:b] @ txt[i], truths[i]) for i, (a, b) in enumerate(spans)]
    return {"metrics": winogavil_metrics(instances), "n": len(spans), "seconds": secs,
            "images_per_second": n_images / secs if secs > 0 else None}


def hf_table_batches(source: str | os.PathLike, split: str = "test"):
    """Record batches of a local copy of a HF dataset, read as data only (no dataset script or
    pickle is run): a ``save_to_disk`` directory (``state.json`` + Arrow stream files), a
    ``DatasetDict`` directory (``dataset_dict.json``; the ``split`` subdirectory), a parquet
    file, or a directory of parquet files (the hub's parquet export; files under a ``split``
    directory or with ``split`` in their name if there are any, else all of them)."""
    src = Path(source)
    if not src.exists():
        raise EvalError(f"{src}: not found")
    if src.is_dir() and (src / "dataset_dict.json").is_file():
        if not (src / split / "state.json").is_file():
            raise EvalError(f"{src}: no '{split}' split in this DatasetDict")
        src = src / split
    if src.is_dir() and (src / "state.json").is_file():
        try:
            files = [f["filename"] for f in json.loads((src / "state.json").read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{src / 'state.json'}: not a datasets save_to_disk state file") from None
        for name in files:
            path = src / Path(name).name  # a bare file name: never a path out of the directory
            try:
                with pa.memory_map(str(path)) as mm:
                    reader = pa.ipc.open_stream(mm)
                    yield from reader
            except (OSError, pa.ArrowInvalid) as e:
                raise EvalError(f"{path}: not an Arrow stream file ({e})") from None
        return
    if src.is_dir():
        files = sorted(src.rglob("*.parquet"))
        picked = [f for f in files if split in f.relative_to(src).parts or split in f.stem.split("-")]
        files = picked or files
        if not files:
            raise EvalError(f"{src}: no save_to_disk dataset (state.json) and no .parquet files")
    else:
        files = [src]
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            yield from pf.iter_batches(batch_size=64)
        except (OSError, pa.ArrowInvalid) as e:
            raise EvalError(f"{f}: not a readable parquet file ({e})") from None


def _name_list(v, where: str) -> list[str]:
    """A list of names as HF stores them: a list, or its JSON / Python-literal text."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            try:
                v = ast.literal_eval(v)  # literals only: never evaluates code
            except (ValueError, SyntaxError):
                raise EvalError(f"{where}: not a list of names: {v[:80]!r}") from None
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise EvalError(f"{where}: expected a list of names, got {type(v).__name__}")
    return list(v)


def winogavil_rows_from_hf(source: str | os.PathLike, split: str = "test"):
    """WinoGAViL rows (for :func:`export_winogavil`) from a local HF copy (:func:`hf_table_batches`).
    ``candidate_images`` must hold the image bytes (HF's Image feature stores ``{bytes, path}``)."""
    n = 0
    for batch in hf_table_batches(source, split):
        missing = [c for c in WINOGAVIL_FIELDS if c not in batch.schema.names]
        if missing:
            raise EvalError(f"{source}: WinoGAViL needs columns {', '.join(WINOGAVIL_FIELDS)}; "
                            f"missing {', '.join(missing)} (found {', '.join(batch.schema.names)})")
        cols = {c: batch.column(c).to_pylist() for c in WINOGAVIL_FIELDS}
        for i in range(batch.num_rows):
            where = f"{source}: row {n}"
            images = []
            for j, im in enumerate(cols["candidate_images"][i] or []):
                data = im.get("bytes") if isinstance(im, dict) else im
                if not isinstance(data, (bytes, bytearray)) or not data:
                    raise EvalError(f"{where}: candidate image {j} has no embedded bytes "
                                    f"(only a path: {im.get('path') if isinstance(im, dict) else None!r})")
                images.append(bytes(data))
            yield {"cue": cols["cue"][i], "candidates": _name_list(cols["candidates"][i], f"{where}, candidates"),
                   "associations": _name_list(cols["associations"][i], f"{where}, associations"),
                   "candidate_images": images}
            n += 1


def export_winogavil(rows, out_dir: str | os.PathLike, shard_size: int = 500) -> int:
    """Write WinoGAViL rows (dicts with cue, candidates, associations and candidate_images: PIL
    images or encoded bytes, as the HF dataset yields them) in the layout above, atomically.
    Returns the number of instances."""
    with replace_dir(out_dir, _OWNED, what="curate eval-export-winogavil", error=EvalError) as tmp:
        return _write_winogavil(rows, tmp, shard_size)


# what eval-export-winogavil writes: only these are ever replaced
_OWNED = re.compile(r"test/(?:[0-9]+\.tar|nshards\.txt)|dataset_type\.txt|count\.txt")


def _write_winogavil(rows, tmp: Path, shard_size: int) -> int:
    (tmp / "test").mkdir(parents=True)
    n, tf = 0, None

    def add(name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    try:
        for row in rows:
            if n % shard_size == 0:
                if tf is not None:
                    tf.close()
                tf = tarfile.open(tmp / "test" / f"{n // shard_size}.tar", "w")
            cands, imgs = list(row["candidates"]), list(row["candidate_images"])
            if len(cands) != len(imgs):
                raise EvalError(f"WinoGAViL row {n}: {len(cands)} candidates but {len(imgs)} images")
            key = f"{n:06d}"
            meta = {"cue": row["cue"], "candidates": cands, "associations": list(row["associations"])}
            add(f"{key}.json", json.dumps(meta).encode())
            for i, im in enumerate(imgs):
                if isinstance(im, (bytes, bytearray)):
                    add(f"{key}.{i}.png" if im[:8] == b"\x89PNG\r\n\x1a\n" else f"{key}.{i}.jpg", bytes(im))
                else:
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, format="PNG")
                    add(f"{key}.{i}.png", buf.getvalue())
            n += 1
        if tf is not None:
            tf.close()
            tf = None
        (tmp / "test" / "nshards.txt").write_text(f"{-(-n // shard_size)}\n")
        (tmp / "dataset_type.txt").write_text("winogavil\n")
        (tmp / "count.txt").write_text(f"{n}\n")
    finally:
        if tf is not None:
            tf.close()
    return n

