"""Generate CommonPool-format pools: the bundled sample pool and large pools for benchmarks.

The layout is what DataComp's ``download_upstream.py`` leaves behind:
``metadata/{stem}.parquet`` (the 9 CommonPool columns), ``metadata/{stem}.npz`` (float16
``b32_img``/``b32_txt``/``l14_img``/``l14_txt``, row i = parquet row i) and ``shards/`` in
img2dataset's layout (``{shard:08d}.tar`` with ``KEY.jpg/.txt/.json``, ``{shard:08d}.parquet``
with one row per attempted download, ``{shard:08d}_stats.json``), where parquet file f's row r
lands in shard ``first_shard(f) + r // 10000`` under key ``shard * 10**4 + r % 10000``, files
taken in sorted name order as img2dataset reads them.

Everything is a function of the seed: the same arguments give the same files, byte for byte
(fixed zip/tar timestamps), so the bundled pool can be regenerated and checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from curate.catalog.checks import make_dir
from curate.shards.tar import write_tar
from curate.uids import pairs_to_hex_array

SAMPLES_PER_SHARD = 10_000

# Concepts: an English noun phrase each (ImageNet-like nouns, plurals and inflected forms that
# WordNet's morphy resolves), the colour and shape the sample image uses for it.
CONCEPTS = [
    ("dog", "brown"), ("cat", "grey"), ("car", "red"), ("bicycle", "blue"), ("mice", "white"),
    ("geese", "white"), ("bird", "yellow"), ("boat", "navy"), ("pizza", "orange"), ("guitar", "black"),
    ("mountain", "green"), ("tree", "green"), ("chair", "wooden"), ("clock", "silver"),
    ("butterfly", "purple"), ("lamp", "gold"),
]
ADJECTIVES = ["small", "large", "old", "new", "happy", "beautiful", "vintage", "cute", "red", "dark"]
SCENES = ["on a table", "in the park", "near the lake", "at night", "in the snow", "on the street",
          "in a garden", "by the window"]
FOREIGN = [
    "ein kleiner Hund im Garten", "une voiture rouge dans la rue", "un gato durmiendo en el sofá",
    "la montagna con la neve", "一只猫在沙发上睡觉", "夜の東京の街並み", "красивая птица на дереве",
    "een fiets bij het kanaal", "uma pizza deliciosa com queijo", "Hund und Katze spielen zusammen",
]
JUNK = ["IMG_2034.JPG", "DSC00012", "photo", "image", "thumbnail 3", "", "   ", "untitled-1.png",
        "click here", "12345"]
WHITESPACE_NOISE = ["\n", "\t", "\u3000", "\xa0", "\x85", "  "]
PALETTE = {
    "brown": (120, 72, 36), "grey": (128, 128, 128), "red": (200, 30, 30), "blue": (30, 60, 200),
    "white": (235, 235, 235), "yellow": (230, 210, 40), "navy": (20, 30, 90), "orange": (240, 140, 20),
    "black": (20, 20, 20), "green": (40, 150, 60), "wooden": (160, 110, 60), "silver": (190, 190, 200),
    "purple": (130, 50, 160), "gold": (210, 170, 50),
}


def _captions(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions, their concept id (-1 = none) and a 'quality' in [0, 1] that drives the scores."""
    kind = rng.choice(5, size=n, p=[0.55, 0.15, 0.12, 0.12, 0.06])
    concept = rng.integers(0, len(CONCEPTS), size=n)
    adj = rng.integers(0, len(ADJECTIVES), size=n)
    scene = rng.integers(0, len(SCENES), size=n)
    pick = rng.integers(0, 1 << 30, size=n)
    texts, quality = [], np.zeros(n)
    for i in range(n):
        noun, _ = CONCEPTS[concept[i]]
        k = kind[i]
        if k == 0:  # good English caption matching the image
            t = f"a {ADJECTIVES[adj[i]]} {noun} {SCENES[scene[i]]}"
            if pick[i] % 7 == 0:
                t = t.replace(" ", WHITESPACE_NOISE[pick[i] % len(WHITESPACE_NOISE)], 1)
            q = 0.9
        elif k == 1:  # English but about something else (mismatched pair)
            other = CONCEPTS[(concept[i] + 1 + pick[i] % (len(CONCEPTS) - 1)) % len(CONCEPTS)][0]
            t = f"{ADJECTIVES[adj[i]]} {other} for sale {SCENES[scene[i]]}"
            q = 0.3
        elif k == 2:  # not English
            t = FOREIGN[pick[i] % len(FOREIGN)]
            q = 0.6
        elif k == 3:  # junk / too short
            t = JUNK[pick[i] % len(JUNK)]
            q = 0.1
        else:  # short English (1-3 words)
            t = " ".join([ADJECTIVES[adj[i]], noun][: 1 + pick[i] % 2]) if pick[i] % 3 else noun
            q = 0.5
        texts.append(t)
        quality[i] = q
    concept = np.where(np.isin(kind, (0, 4)), concept, -1)
    return texts, concept, quality


def _face_bboxes(rng: np.random.Generator, n: int) -> pa.Array:
    """Mostly empty face box lists, some with 1-3 boxes [x0, y0, x1, y1] as fractions."""
    n_boxes = np.where(rng.random(n) < 0.1, rng.integers(1, 4, size=n), 0)
    offsets = np.concatenate(([0], np.cumsum(n_boxes))).astype(np.int32)
    total = int(offsets[-1])
    x0 = rng.uniform(0, 0.7, total)
    y0 = rng.uniform(0, 0.7, total)
    w = rng.uniform(0.05, 0.3, total)
    boxes = np.stack([x0, y0, np.minimum(x0 + w, 1), np.minimum(y0 + w, 1)], axis=1).ravel()
    inner = pa.FixedSizeListArray.from_arrays(pa.array(boxes, pa.float64()), 4).cast(pa.list_(pa.float64()))
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _dims(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    w = rng.choice([0, 64, 150, 199, 200, 256, 320, 480, 512, 640, 800, 1024, 1200, 1920], size=n,
                   p=[0.01, 0.04, 0.05, 0.03, 0.04, 0.1, 0.1, 0.1, 0.1, 0.13, 0.1, 0.08, 0.06, 0.06])
    aspect = rng.choice([1.0, 0.75, 1.333, 1.5, 0.5, 3.0, 3.2, 0.25], size=n,
                        p=[0.35, 0.15, 0.15, 0.15, 0.08, 0.04, 0.04, 0.04])
    h = np.floor(w / aspect).astype(np.int64)
    return w.astype(np.int64), h


def _scores(rng, quality, n):
    b32 = (0.12 + 0.2 * quality + rng.normal(0, 0.05, n)).astype(np.float32)
    l14 = (0.08 + 0.22 * quality + rng.normal(0, 0.05, n)).astype(np.float32)
    nan = rng.random(n) < 0.002
    b32[nan] = np.nan
    l14[nan] = np.nan
    return b32, l14


def _uids(rng: np.random.Generator, n: int) -> pa.Array:
    words = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 2), dtype=np.uint64, endpoint=True)
    return pairs_to_hex_array(words[:, 0], words[:, 1])


def _fast_captions(rng, n):
    """Vectorised captions for large benchmark pools (no per-row Python formatting)."""
    vocab = np.array([f"a {a} {c[0]} {s}" for a in ADJECTIVES for c in CONCEPTS for s in SCENES]
                     + FOREIGN + JUNK, dtype=object)
    idx = rng.integers(0, len(vocab), size=n)
    return pa.array(vocab[idx], pa.string()), np.clip(rng.random(n), 0, 1)


def generate_metadata_table(rng, n: int, start: int, fast: bool = False):
    if fast:
        text, quality = _fast_captions(rng, n)
        concept = np.full(n, -1)
    else:
        texts, concept, quality = _captions(rng, n)
        text = pa.array(texts, pa.string())
    w, h = _dims(rng, n)
    b32, l14 = _scores(rng, quality, n)
    sha = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 2), dtype=np.uint64, endpoint=True)
    sha_hex = pa.compute.binary_join_element_wise(
        pairs_to_hex_array(sha[:, 0], sha[:, 1]), pairs_to_hex_array(sha[:, 1], sha[:, 0]), "")
    urls = pa.compute.binary_join_element_wise(
        "https://images.example.com/", pa.array(np.arange(start, start + n).astype(str)), ".jpg", "")
    table = pa.table({
        "uid": _uids(rng, n),
        "url": urls,
        "text": text,
        "original_width": pa.array(w, pa.int64()),
        "original_height": pa.array(h, pa.int64()),
        "clip_b32_similarity_score": pa.array(b32, pa.float32()),
        "clip_l14_similarity_score": pa.array(l14, pa.float32()),
        "face_bboxes": _face_bboxes(rng, n),
        "sha256": sha_hex,
    })
    return table, concept, quality


def _embeddings(rng, concept, quality, dims, centers):
    """Image/text embeddings near a concept centre (random direction when there is none)."""
    n = len(concept)
    out = {}
    for name, d in dims.items():
        base = np.where(concept[:, None] >= 0, centers[name][np.maximum(concept, 0)],
                        rng.normal(0, 1, (n, d)) / np.sqrt(d))
        img = base + rng.normal(0, 1.0 / np.sqrt(d), (n, d)) * 0.8
        txt = np.where((quality > 0.5)[:, None], base, rng.normal(0, 1, (n, d)) / np.sqrt(d))
        txt = txt + rng.normal(0, 1.0 / np.sqrt(d), (n, d)) * 0.8
        for kind, v in (("img", img), ("txt", txt)):
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
            out[f"{name}_{kind}"] = v.astype(np.float16)
    return out


def write_npz(path: Path, arrays: dict) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _image(concept: int, seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    noun, colour = CONCEPTS[concept] if concept >= 0 else ("?", None)
    fg = PALETTE.get(colour) or tuple(int(c) for c in rng.integers(0, 255, 3))
    bg = tuple(int(c) for c in rng.integers(150, 255, 3))
    im = Image.new("RGB", (size, size), bg)
    dr = ImageDraw.Draw(im)
    shape = (concept if concept >= 0 else int(rng.integers(0, 16))) % 4
    m = int(rng.integers(2, size // 4))
    box = [m, m, size - m, size - m]
    if shape == 0:
        dr.ellipse(box, fill=fg)
    elif shape == 1:
        dr.rectangle(box, fill=fg)
    elif shape == 2:
        dr.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    else:
        dr.line([(m, m), (size - m, size - m)], fill=fg, width=max(2, size // 8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(shards_dir: Path, table: pa.Table, concept, first_shard: int, rng, image_size: int):
    """img2dataset-layout shards for one metadata file; returns the pool sha256 column to use."""
    n = table.num_rows
    status = rng.choice(3, size=n, p=[0.93, 0.05, 0.02])  # success, failed_to_download, failed_to_resize
    uids = table.column("uid").to_pylist()
    texts = table.column("text").to_pylist()
    urls = table.column("url").to_pylist()
    boxes = table.column("face_bboxes").to_pylist()
    pool_sha = table.column("sha256").to_pylist()
    for s0 in range(0, n, SAMPLES_PER_SHARD):
        shard = first_shard + s0 // SAMPLES_PER_SHARD
        rows = range(s0, min(n, s0 + SAMPLES_PER_SHARD))
        records, members = [], {}
        for r in rows:
            key = f"{shard * SAMPLES_PER_SHARD + (r - s0):012d}"
            ok = status[r] == 0
            meta = {
                "uid": uids[r], "face_bboxes": boxes[r], "caption": texts[r], "url": urls[r], "key": key,
                "status": ["success", "failed_to_download", "failed_to_resize"][status[r]],
                "error_message": [None, "HTTP Error 404: Not Found", "image file is truncated"][status[r]],
                "width": image_size if ok else None, "height": image_size if ok else None,
                "original_width": image_size if ok else None, "original_height": image_size if ok else None,
                "exif": None, "sha256": None,
            }
            if ok:
                img = _image(int(concept[r]), int(rng.integers(0, 1 << 31)), image_size)
                meta["sha256"] = hashlib.sha256(img).hexdigest()
                pool_sha[r] = meta["sha256"]  # what the pool recorded when it was built
                members[key] = (img, texts[r].encode(), json.dumps(meta).encode())
            records.append(meta)
        order = list(members)
        rng.shuffle(order)  # img2dataset writes in download-completion order, not key order
        write_tar(shards_dir / f"{shard:08d}.tar",
                  ((f"{key}.{ext}", data) for key in order for ext, data in zip(("jpg", "txt", "json"), members[key])),
                  owner="curate")
        meta_table = pa.Table.from_pylist(records)
        pq.write_table(meta_table.drop_columns(["face_bboxes"]), shards_dir / f"{shard:08d}.parquet")
        successes = len(members)
        stats = {
            "count": len(rows), "successes": successes,
            "failed_to_download": int((status[s0:s0 + len(rows)] == 1).sum()),
            "failed_to_resize": int((status[s0:s0 + len(rows)] == 2).sum()),
            "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
            "status_dict": {"success": successes},
        }
        (shards_dir / f"{shard:08d}_stats.json").write_text(json.dumps(stats, indent=4))
    return pa.array(pool_sha, pa.string())


def generate_pool(out: str | Path, files: int = 2, rows_per_file: int = 1000, seed: int = 0,
                  npz: bool = True, shards: bool = True, image_size: int = 40, fast: bool = False,
                  progress=None) -> Path:
    """Write a CommonPool-format pool to ``out`` (``metadata/`` and, optionally, ``shards/``)."""
    out = Path(out)
    meta_dir = out / "metadata"
    make_dir(meta_dir, what="pool directory")
    if shards:
        make_dir(out / "shards", what="pool directory")
    rng = np.random.default_rng(seed)
    dims = {"b32": 512, "l14": 768}
    centers = {k: rng.normal(0, 1, (len(CONCEPTS), d)) / np.sqrt(d) for k, d in dims.items()}
    stems = [hashlib.md5(f"curate-sample-{seed}-{f}".encode()).hexdigest() for f in range(files)]
    # img2dataset reads metadata files in sorted name order and numbers shards on in that order
    per_file = -(-rows_per_file // SAMPLES_PER_SHARD)
    first_shard = {stem: i * per_file for i, stem in enumerate(sorted(stems))}
    it = range(files) if progress is None else progress(range(files))
    for f in it:
        frng = np.random.default_rng([seed, f])
        stem = stems[f]
        table, concept, quality = generate_metadata_table(frng, rows_per_file, f * rows_per_file, fast=fast)
        if shards:
            sha = write_shards(out / "shards", table, concept, first_shard[stem], frng, image_size)
            table = table.set_column(table.schema.get_field_index("sha256"), "sha256", sha)
        pq.write_table(table, meta_dir / f"{stem}.parquet", row_group_size=min(rows_per_file, 122_880) or 1)
        if npz:
            write_npz(meta_dir / f"{stem}.npz", _embeddings(frng, concept, quality, dims, centers))
    return out
