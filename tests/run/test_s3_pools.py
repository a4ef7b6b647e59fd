"""Pools in object storage (issue 17): a catalog made with ``curate ray catalog-init`` over
``s3://`` metadata, on a loopback S3 server (moto), used by ``curate run`` (local and Ray
engines) and ``curate features text``.

The reference for every output is the same pool on local disk, with the local engine (itself
pinned by the filter tests). Remote paths must stay URLs (no ``.../s3:/bucket/...`` local path),
DuckDB must read them through the fsspec filesystem curate registers (no ``httpfs`` extension
fetched at run time), and the filter sandbox must allow exactly the pool's
``s3://bucket/prefix/`` and nothing else on S3 (docs/safety.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from click.testing import CliRunner  # noqa: E402

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.cli.main import main  # noqa: E402
from tests.conftest import loopback_s3  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: the bundled filters that read no embeddings: image_based* read `curate clusters` output and the
#: negCLIPLoss/NormSim ones the pool's npz files, which these producers take from local disk only
#: (docs/distributed.md)
FILTERS = sorted(f.stem for f in (REPO / "filters").glob("*.sql")
                 if not f.stem.startswith(("image_based", "negcliploss", "normsim", "semdedup", "dbp", "decontaminate")))
#: the Ray engine is slower to start per run: two filters, one with a feature table and one
#: with a global threshold
RAY_FILTERS = ["basic_filter", "clip_score_l14_30pct"]
META = "s3://pool/dc/metadata"


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server with buckets ``pool`` and ``other``; yields (fsspec options, endpoint)."""
    with loopback_s3("pool", "other") as server:
        yield server


def _env(opts) -> dict:
    return {"CURATE_STORAGE_OPTIONS": json.dumps(opts)}


@pytest.fixture(scope="module")
def pools(s3, tmp_path_factory):
    """The same generated pool (2 files x 150 rows) on local disk and under s3://pool/dc/metadata,
    a catalog over each, and readable parquet files elsewhere on S3 that no filter may read."""
    from curate import storage
    from curate.pool.sample import generate_pool

    opts, _ = s3
    root = tmp_path_factory.mktemp("s3pools")
    generate_pool(root / "pool", files=2, rows_per_file=150, seed=7, npz=False, shards=False)
    fs, _ = storage.filesystem("s3://pool", opts)
    parquets = sorted((root / "pool" / "metadata").glob("*.parquet"))
    for f in parquets:
        fs.put(str(f), f"pool/dc/metadata/{f.name}")
    for key in ("pool/dc/private/x.parquet", "pool/dc/metadata-old/x.parquet", "other/dc/metadata/x.parquet"):
        fs.put(str(parquets[0]), key)
    local = init_catalog(root / "local.duckdb", pool=root / "pool")
    r = CliRunner().invoke(main, ["ray", "catalog-init", str(root / "s3.duckdb"), "--metadata", META,
                                  "--storage-options", json.dumps(opts)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {root / 's3.duckdb'}: 300 samples in 2 parquet files under {META}")
    return {"root": root, "local": local, "s3": root / "s3.duckdb", "opts": opts}


def _run(args, opts):
    return CliRunner().invoke(main, args, env=_env(opts))


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_catalog_keeps_urls_and_a_local_features_dir(pools):
    import duckdb

    con = duckdb.connect(str(pools["s3"]), read_only=True)
    try:
        paths = [p for (p,) in con.execute("SELECT path FROM pool_files ORDER BY file_id").fetchall()]
        meta = dict(con.execute("SELECT key, value FROM curate_meta").fetchall())
    finally:
        con.close()
    names = sorted(p.name for p in (pools["root"] / "pool" / "metadata").glob("*.parquet"))
    assert paths == [f"{META}/{n}" for n in names]
    assert meta["metadata_dir"] == META
    assert meta["features_dir"] == str(pools["root"] / "s3.duckdb.features")  # beside the catalog file


@pytest.mark.parametrize("flt", FILTERS)
def test_every_filter_on_s3_pool_is_byte_identical_to_local_disk(pools, tmp_path, flt):
    r = _run(["run", flt, "-c", str(pools["local"]), "-o", str(tmp_path / "local.npy")], pools["opts"])
    assert r.exit_code == 0, r.output
    r = _run(["run", flt, "-c", str(pools["s3"]), "-o", str(tmp_path / "s3.npy")], pools["opts"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s3.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    man = json.loads((tmp_path / "s3.json").read_text())
    assert man["pool_rows"] == 300
    assert _leftovers(tmp_path, {"local.npy", "local.json", "s3.npy", "s3.json"}) == []


def test_local_run_needs_no_duckdb_extension(pools):
    """The pool is read through the registered fsspec filesystem: httpfs is never loaded."""
    from curate.run.query import open_filter

    opened = open_filter(REPO / "filters" / "no_filter.sql", pools["s3"], storage_options=pools["opts"])
    try:
        assert opened.con.execute("SELECT count(*) FROM pool").fetchone()[0] == 300
        assert "s3" in opened.con.list_filesystems()
        # no extension can be fetched or loaded on the filter's connection: fsspec did the read
        assert opened.con.execute("SELECT current_setting('autoinstall_known_extensions'), "
                                  "current_setting('autoload_known_extensions')").fetchone() == (False, False)
    finally:
        opened.con.close()


@pytest.mark.parametrize("flt", RAY_FILTERS)
def test_ray_engine_on_s3_pool_is_byte_identical_to_local_disk(ray_session, pools, tmp_path, flt):
    r = _run(["run", flt, "-c", str(pools["local"]), "-o", str(tmp_path / "local.npy")], pools["opts"])
    assert r.exit_code == 0, r.output
    r = _run(["run", flt, "-c", str(pools["s3"]), "-o", str(tmp_path / "ray.npy"), "--engine", "ray"],
             pools["opts"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ray.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    assert json.loads((tmp_path / "ray.json").read_text())["engine"]["partitions"] == 2
    assert _leftovers(tmp_path, {"local.npy", "local.json", "ray.npy", "ray.json"}) == []


def test_ray_run_command_on_s3_pool(ray_session, pools, tmp_path):
    """`curate ray run` with the options on the command line (no environment)."""
    r = _run(["run", "basic_filter", "-c", str(pools["local"]), "-o", str(tmp_path / "local.npy")], pools["opts"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["ray", "run", "basic_filter", "-c", str(pools["s3"]), "-o", str(tmp_path / "r.npy"),
                                  "--storage-options", json.dumps(pools["opts"])],
                           env=_env(pools["opts"]))  # the features step reads $CURATE_STORAGE_OPTIONS
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()


def _s3_catalog(pools, tmp_path, name) -> Path:
    from curate.catalog.remote import init_remote_catalog

    return init_remote_catalog(tmp_path / name, META, storage_options=pools["opts"],
                               features_dir=tmp_path / f"{name}.feat")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_features_text_on_s3_pool_matches_local_disk(request, pools, tmp_path, engine):
    import pyarrow.parquet as pq

    if engine == "ray":
        request.getfixturevalue("ray_session")
    ref = init_catalog(tmp_path / "ref.duckdb", pool=pools["root"] / "pool", features_dir=tmp_path / "ref.feat")
    r = _run(["features", "text", str(ref)], pools["opts"])
    assert r.exit_code == 0, r.output
    cat = _s3_catalog(pools, tmp_path, "s3.duckdb")
    r = _run(["features", "text", str(cat), "--engine", engine], pools["opts"])
    assert r.exit_code == 0, r.output
    assert "computed 2 file(s) (300 captions" in r.output
    expected = sorted(p.name for p in (tmp_path / "ref.feat" / "text_features").glob("*.parquet"))
    assert len(expected) == 2
    assert sorted(p.name for p in (tmp_path / "s3.duckdb.feat" / "text_features").glob("*.parquet")) == expected
    for name in expected:
        a = pq.read_table(tmp_path / "ref.feat" / "text_features" / name)
        b = pq.read_table(tmp_path / "s3.duckdb.feat" / "text_features" / name)
        assert a.equals(b) and a.schema.metadata == b.schema.metadata  # same source identity too
    again = _run(["features", "text", str(cat), "--engine", engine], pools["opts"])
    assert again.exit_code == 0 and "computed 0 file(s)" in again.output, again.output  # resume


def test_ray_features_text_command_on_s3_pool(ray_session, pools, tmp_path):
    cat = _s3_catalog(pools, tmp_path, "s3.duckdb")
    r = _run(["ray", "features-text", "-c", str(cat)], pools["opts"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("text_features: computed 2 file(s) (300 captions), 0 up to date")


def test_missing_s3_pool_file_is_named(pools, tmp_path):
    from curate import storage

    opts = pools["opts"]
    fs, _ = storage.filesystem("s3://pool", opts)
    names = sorted(p.name for p in (pools["root"] / "pool" / "metadata").glob("*.parquet"))
    for n in names:
        fs.copy(f"pool/dc/metadata/{n}", f"pool/gone/metadata/{n}")
    from curate.catalog.remote import init_remote_catalog

    cat = init_remote_catalog(tmp_path / "gone.duckdb", "s3://pool/gone/metadata", storage_options=opts)
    fs.rm(f"pool/gone/metadata/{names[1]}")
    r = _run(["features", "text", str(cat)], opts)
    assert r.exit_code == 1
    assert r.output == f"error: s3://pool/gone/metadata/{names[1]}: pool file listed in the catalog is missing\n"
    assert not (tmp_path / "gone.duckdb.features" / "text_features").exists() or not any(
        (tmp_path / "gone.duckdb.features" / "text_features").iterdir())
    r = _run(["run", "no_filter", "-c", str(cat), "-o", str(tmp_path / "x.npy")], opts)
    assert r.exit_code == 1
    assert r.output == (f"error: {REPO / 'filters' / 'no_filter.sql'}: the pool changed since `curate catalog "
                        f"init`: s3://pool/gone/metadata/{names[1]} is missing; re-run `curate catalog init` "
                        f"over the pool\n")
    assert not (tmp_path / "x.npy").exists()


def _hostile(endpoint: str) -> list[tuple[str, str]]:
    """(id, URL) of readable parquet files outside the pool's s3://pool/dc/metadata/ prefix."""
    return [
        ("other_bucket", "s3://other/dc/metadata/x.parquet"),
        ("same_bucket_other_prefix", "s3://pool/dc/private/x.parquet"),
        ("sibling_prefix", "s3://pool/dc/metadata-old/x.parquet"),
        ("glob_over_prefixes", "s3://pool/dc/*/x.parquet"),
        ("dot_segment", "s3://pool/dc/metadata/../private/x.parquet"),
        ("s3a_alias", "s3a://pool/dc/private/x.parquet"),
        ("plain_http_endpoint", f"{endpoint}/pool/dc/private/x.parquet"),
    ]


HOSTILE_IDS = [h[0] for h in _hostile("http://x")]


@pytest.mark.parametrize("case", range(len(HOSTILE_IDS)), ids=HOSTILE_IDS)
def test_filter_reading_elsewhere_on_s3_is_refused(s3, pools, tmp_path, case):
    _, url = _hostile(s3[1])[case]
    flt = tmp_path / "hostile.sql"
    flt.write_text(f"SELECT uid FROM read_parquet('{url}')\n")
    out = tmp_path / "out.npy"
    out.write_bytes(b"existing subset\n")  # a failed run must not touch what was there
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _run(["run", str(flt), "-c", str(pools["s3"]), "-o", str(out)], pools["opts"])
    assert r.exit_code == 1
    assert r.output == (f"error: {flt}: reads {url}, outside what the catalog points at "
                        f"(filters are sandboxed: docs/safety.md)\n")
    assert out.read_bytes() == b"existing subset\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("url", ["s3://other/dc/metadata/x.parquet", "s3://pool/dc/private/x.parquet",
                                 "s3://pool/dc/metadata/../private/x.parquet"])
def test_filter_reading_elsewhere_on_s3_is_refused_on_ray(ray_session, pools, tmp_path, url):
    flt = tmp_path / "hostile.sql"
    flt.write_text(f"SELECT p.uid FROM pool AS p JOIN read_parquet('{url}') AS x ON p.uid = x.uid\n")
    out = tmp_path / "out.npy"
    out.write_bytes(b"existing subset\n")
    r = _run(["run", str(flt), "-c", str(pools["s3"]), "-o", str(out), "--engine", "ray"], pools["opts"])
    assert r.exit_code == 1
    assert r.output == (f"error: {flt}: reads {url}, outside what the catalog points at "
                        f"(filters are sandboxed: docs/safety.md)\n")
    assert out.read_bytes() == b"existing subset\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.sql", "out.npy"]


@pytest.mark.parametrize("args, message", [
    (["--metadata", "s3://pool/dc/metadata/../private"],
     "error: s3://pool/dc/metadata/../private: a '..' segment is not allowed in a pool URL\n"),
    (["--metadata", "s3://pool/nothing/here"], "error: s3://pool/nothing/here: metadata directory not found\n"),
])
def test_catalog_init_refusals(pools, tmp_path, args, message):
    cat = tmp_path / "c.duckdb"
    r = _run(["ray", "catalog-init", str(cat), *args], pools["opts"])
    assert r.exit_code == 1
    assert r.output == message
    assert list(tmp_path.iterdir()) == []


def test_features_dir_of_a_remote_catalog_must_be_local(pools, tmp_path):
    from curate.catalog.remote import init_remote_catalog
    from curate.errors import CurateError

    with pytest.raises(CurateError) as e:
        init_remote_catalog(tmp_path / "c.duckdb", META, storage_options=pools["opts"], features_dir="s3://pool/feat")
    assert str(e.value) == "s3://pool/feat: the features directory must be a local directory"
    assert list(tmp_path.iterdir()) == []
