"""curate byod score: a tiny randomly initialised open_clip model (custom config) saved to a file,
scoring img2dataset-layout shards into the pool's parquet + npz format.

Expected values are computed here independently of curate.pool.byod: the model is run directly on
the images and captions read from the tars, and the score is the dot product of the
L2-normalised embeddings (DataComp's definition).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from curate.pool.byod import ByodError, load_model, score_shards  # noqa: E402
from curate.catalog.connection import connect, init_catalog  # noqa: E402
from curate.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SHARDS = REPO / "data" / "sample_pool" / "shards"

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, checkpoint path) of a random-init tiny CLIP, saved like open_clip's trainer does."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    ckpt = d / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return cfg, ckpt


def small_shards(tmp_path: Path, n: int = 40) -> Path:
    """The first n samples of the bundled pool's two shards (same layout, fewer rows: fast)."""
    out = tmp_path / "data" / "shards"
    out.mkdir(parents=True)
    for shard in (0, 1):
        name = f"{shard:08d}"
        meta = pq.read_table(SAMPLE_SHARDS / f"{name}.parquet").sort_by("key")
        keep = set(meta.column("key").to_pylist()[:n])
        pq.write_table(meta.filter(pa.array([k in keep for k in meta.column("key").to_pylist()])), out / f"{name}.parquet")
        with tarfile.open(SAMPLE_SHARDS / f"{name}.tar") as src, tarfile.open(out / f"{name}.tar", "w") as dst:
            for m in src.getmembers():
                if m.name.split(".")[0] in keep:
                    dst.addfile(m, src.extractfile(m))
        shutil.copy(SAMPLE_SHARDS / f"{name}_stats.json", out / f"{name}_stats.json")
    return out


def reference_scores(shards: Path, shard: int, model, preprocess, tokenizer) -> dict[str, tuple[float, np.ndarray]]:
    """key -> (score, image embedding) computed straight from the tar, one sample at a time."""
    out = {}
    with tarfile.open(shards / f"{shard:08d}.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        for name in members:
            key, ext = name.split(".", 1)
            if ext != "jpg":
                continue
            img = Image.open(io.BytesIO(tf.extractfile(members[name]).read())).convert("RGB")
            text = tf.extractfile(members[f"{key}.txt"]).read().decode()
            with torch.no_grad():
                i = model.encode_image(preprocess(img)[None]).float()
                t = model.encode_text(tokenizer([text])).float()
            i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            out[key] = (float((i * t).sum()), i[0].numpy())
    return out


def test_score_shards_matches_direct_model_run(tmp_path, tiny):
    cfg, ckpt = tiny
    shards = small_shards(tmp_path)
    # fail one sample: drop its image from the tar and mark it failed, as img2dataset would
    meta = pq.read_table(shards / "00000000.parquet").sort_by("key")
    status = meta.column("status").to_pylist()
    drop = status.index("success")
    gone = meta.column("key")[drop].as_py()
    status[drop] = "failed_to_download"
    meta = meta.set_column(meta.schema.get_field_index("status"), "status", pa.array(status))
    pq.write_table(meta, shards / "00000000.parquet")
    with tarfile.open(SAMPLE_SHARDS / "00000000.tar") as src, tarfile.open(shards / "00000000.tar.new", "w") as dst:
        keep = set(meta.column("key").to_pylist()) - {gone}
        for m in src.getmembers():
            if m.name.split(".")[0] in keep:
                dst.addfile(m, src.extractfile(m))
    (shards / "00000000.tar.new").replace(shards / "00000000.tar")

    model, preprocess, tokenizer, name = load_model(None, ckpt, model_config=cfg)
    assert name == "tiny-clip"
    out = tmp_path / "scored"
    res = score_shards(shards, out, model, preprocess, tokenizer, embedding="l14", batch_size=16, progress=False)
    ref = reference_scores(shards, 0, model, preprocess, tokenizer)
    ref1 = reference_scores(shards, 1, model, preprocess, tokenizer)
    assert gone not in ref
    assert (res.shards, res.skipped, res.rows, res.images) == (2, 0, 80, len(ref) + len(ref1))

    t = pq.read_table(out / "00000000.parquet")
    assert t.column_names == ["uid", "url", "text", "original_width", "original_height",
                              "clip_b32_similarity_score", "clip_l14_similarity_score", "face_bboxes", "sha256"]
    z = np.load(out / "00000000.npz")
    assert sorted(z.files) == ["l14_img", "l14_txt"]
    assert z["l14_img"].dtype == np.float16 and z["l14_img"].shape == (40, 32)
    keys = meta.column("key").to_pylist()
    scores = t.column("clip_l14_similarity_score").to_pylist()
    assert t.column("uid").to_pylist() == meta.column("uid").to_pylist()  # rows in key order
    for row, key in enumerate(keys):
        if key not in ref:  # failed in the bundled pool, or dropped above
            assert scores[row] is None  # NULL, not NaN
            assert not z["l14_img"][row].any()
            assert np.isclose(np.linalg.norm(z["l14_txt"][row].astype(np.float32)), 1.0, atol=1e-2)
        else:
            assert scores[row] == pytest.approx(ref[key][0], abs=1e-4)
            assert np.allclose(z["l14_img"][row].astype(np.float32), ref[key][1], atol=2e-3)
    assert t.column("clip_b32_similarity_score").null_count == 40

    # resume: nothing left to do
    again = score_shards(shards, out, model, preprocess, tokenizer, embedding="l14", progress=False)
    assert (again.shards, again.skipped) == (0, 2)

    # the output is a pool: the catalog accepts it and the usual SQL runs on it
    cat = init_catalog(tmp_path / "byod.duckdb", metadata=out, shards=shards)
    con = connect(cat)
    n, scored, first_shard = con.execute(
        "SELECT count(*), count(clip_l14_similarity_score), max(first_shard) FROM pool, pool_files").fetchone()
    assert (n, scored) == (80 * 2, (len(ref) + len(ref1)) * 2) and first_shard == 1
    above = con.execute("SELECT count(*) FROM pool WHERE clip_l14_similarity_score >= 0").fetchone()[0]
    assert above == sum(s >= 0 for s, _ in ref.values()) + sum(s >= 0 for s, _ in ref1.values())


def test_byod_score_cli_and_bad_input(tmp_path, tiny):
    cfg, ckpt = tiny
    shards = small_shards(tmp_path, n=8)
    data = shards.parent
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(data), "--model-config", str(cfg),
                                  "--checkpoint", str(ckpt), "--catalog", str(tmp_path / "c.duckdb")])
    assert r.exit_code == 0, r.output
    images = sum(1 for s in (0, 1) for m in tarfile.open(shards / f"{s:08d}.tar").getnames() if m.endswith(".jpg"))
    assert f"scored 2 shards (0 already done): 16 rows, {images} images" in r.output
    assert sorted(p.name for p in (data / "metadata_scored").iterdir()) == [
        ".byod_model.json", "00000000.npz", "00000000.parquet", "00000001.npz", "00000001.parquet"]
    con = connect(tmp_path / "c.duckdb")
    assert con.execute("SELECT count(*) FROM pool WHERE clip_l14_similarity_score IS NOT NULL").fetchone()[0] == images
    con.close()

    def run(*args):
        res = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(data), *args])
        assert res.exit_code == 1, res.output
        return res.output

    assert "checkpoint file not found" in run("--model-config", str(cfg), "--checkpoint", str(tmp_path / "nope.pt"))
    assert "not an open_clip architecture" in run("--model", "NoSuchNet", "--checkpoint", str(ckpt))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "cannot load as tiny-clip weights" in run("--model-config", str(cfg), "--checkpoint", str(bad))
    # another model's weights for the same output dir: refused, not mixed
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), other)
    assert "already scored with tiny-clip" in run("--model-config", str(cfg), "--checkpoint", str(other))
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    with pytest.raises(ByodError, match="no finished shard"):
        model, pre, tok, _ = load_model(None, ckpt, cfg)
        score_shards(empty / "shards", tmp_path / "o", model, pre, tok, progress=False)


def source_metadata(tmp_path: Path) -> Path:
    """The bundled pool's metadata (the shards' source) plus two columns of the user's own: a
    timestamp and a string. Row r of file f gets f"{f}-{r}" and 2000-01-01 + r days, so any
    misalignment between shard samples and metadata rows shows."""
    import datetime as dt

    src = SAMPLE_SHARDS.parent / "metadata"
    out = tmp_path / "data" / "metadata"
    out.mkdir(parents=True)
    for f, p in enumerate(sorted(src.glob("*.parquet"))):
        t = pq.read_table(p)
        n = t.num_rows
        t = t.append_column("posted", pa.array([dt.datetime(2000, 1, 1) + dt.timedelta(days=r) for r in range(n)],
                                               pa.timestamp("us")))
        t = t.append_column("source_id", pa.array([f"{f}-{r}" for r in range(n)]))
        pq.write_table(t, out / p.name, row_group_size=300)  # several row groups: slices cross them
    return out


def test_byod_keeps_source_columns(tmp_path, tiny):
    cfg, ckpt = tiny
    shards = small_shards(tmp_path, n=40)
    meta_dir = source_metadata(tmp_path)
    model, pre, tok, _ = load_model(None, ckpt, cfg)
    res = score_shards(shards, tmp_path / "scored", model, pre, tok, embedding="l14", progress=False,
                       metadata_dir=meta_dir)
    assert res.carried == ["posted", "source_id"]
    for shard in (0, 1):
        t = pq.read_table(tmp_path / "scored" / f"{shard:08d}.parquet")
        assert t.column_names[9:] == ["posted", "source_id"] and t.schema.field("posted").type == pa.timestamp("us")
        keys = pq.read_table(shards / f"{shard:08d}.parquet").sort_by("key").column("key").to_pylist()
        rows = [int(k) - shard * 10_000 for k in keys]
        # expected straight from the source file: shard s is file s here (1,000 rows per file)
        src = pq.read_table(sorted(meta_dir.glob("*.parquet"))[shard])
        assert t.column("uid").to_pylist() == [src.column("uid")[r].as_py() for r in rows]
        assert t.column("source_id").to_pylist() == [f"{shard}-{r}" for r in rows]
        assert t.column("posted").to_pylist() == [src.column("posted")[r].as_py() for r in rows]

    # the scored metadata is a pool with the extra columns: SQL on them works
    cat = init_catalog(tmp_path / "byod.duckdb", metadata=tmp_path / "scored", shards=shards)
    con = connect(cat)
    assert con.execute("SELECT count(*), min(posted), count(DISTINCT source_id) FROM pool").fetchone() == (
        80, __import__("datetime").datetime(2000, 1, 1), 80)
    con.close()

    # the CLI finds DATA_DIR/metadata by itself and says what it kept
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(shards.parent), "--model-config", str(cfg),
                                  "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli_out")])
    assert r.exit_code == 0, r.output
    assert "kept source columns posted, source_id" in r.output
    assert pq.read_schema(tmp_path / "cli_out" / "00000001.parquet").names[9:] == ["posted", "source_id"]


def test_byod_refuses_metadata_the_shards_did_not_come_from(tmp_path, tiny):
    cfg, ckpt = tiny
    shards = small_shards(tmp_path, n=8)
    meta_dir = source_metadata(tmp_path)
    first = sorted(meta_dir.glob("*.parquet"))[0]
    t = pq.read_table(first)
    uids = t.column("uid").to_pylist()
    uids[3] = "0" * 32  # row 3 of file 0 = sample 000000000003 of shard 0
    pq.write_table(t.set_column(0, "uid", pa.array(uids)), first)
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(shards.parent), "--model-config", str(cfg),
                                  "--checkpoint", str(ckpt)])
    assert r.exit_code == 1
    assert "00000000.parquet: sample 000000000003 has uid" in r.output and f"row 3 of {first}" in r.output
    assert not (shards.parent / "metadata_scored" / "00000000.parquet").exists()
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(shards.parent), "--model-config", str(cfg),
                                  "--checkpoint", str(ckpt), "--metadata-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "nowhere: metadata directory not found" in r.output
