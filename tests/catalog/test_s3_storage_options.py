"""A pool in object storage with its credentials given only on the command line (issue 17).

`curate ray catalog-init --storage-options JSON --features-dir DIR`, then `curate ray run` and
`curate ray features-text` with the same `--storage-options` and nothing in the environment
(no ``$CURATE_STORAGE_OPTIONS``, no AWS variables): the feature builds a filter needs (text
features, CLD3 labels) must read the S3 pool with those options too. The server is a loopback
S3 (moto) with credentials it accepts; the reference for every output is the same pool on local
disk (pinned by the filter tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from click.testing import CliRunner  # noqa: E402

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.cli.main import main  # noqa: E402
from tests.conftest import loopback_s3  # noqa: E402

META = "s3://pool/dc/metadata"
#: every variable that could hand S3 credentials or an endpoint to a reader behind the CLI's back
ENV_VARS = ("CURATE_STORAGE_OPTIONS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from curate import storage
    from curate.pool.sample import generate_pool

    with loopback_s3("pool") as (opts, _):
        root = tmp_path_factory.mktemp("s3opts")
        generate_pool(root / "pool", files=2, rows_per_file=120, seed=11, npz=False, shards=False)
        fs, _ = storage.filesystem("s3://pool", opts)
        for f in sorted((root / "pool" / "metadata").glob("*.parquet")):
            fs.put(str(f), f"pool/dc/metadata/{f.name}")
        yield {"root": root, "opts": opts, "json": json.dumps(opts)}


@pytest.fixture
def no_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)


def _catalog(pool, tmp_path, name="s3.duckdb") -> tuple[Path, Path]:
    cat, feats = tmp_path / name, tmp_path / "shared-features"
    r = CliRunner().invoke(main, ["ray", "catalog-init", str(cat), "--metadata", META,
                                  "--storage-options", pool["json"], "--features-dir", str(feats)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {cat}: 240 samples in 2 parquet files under {META}")
    assert f"feature tables go to {feats}" in r.output
    return cat, feats


def test_catalog_init_features_dir(pool, tmp_path, no_env):
    import duckdb

    cat, feats = _catalog(pool, tmp_path)
    con = duckdb.connect(str(cat), read_only=True)
    try:
        meta = dict(con.execute("SELECT key, value FROM curate_meta").fetchall())
    finally:
        con.close()
    assert meta["features_dir"] == str(feats) and meta["metadata_dir"] == META
    assert not (tmp_path / "s3.duckdb.features").exists()
    # the default stays beside the catalog file
    r = CliRunner().invoke(main, ["ray", "catalog-init", str(tmp_path / "d.duckdb"), "--metadata", META,
                                  "--storage-options", pool["json"]])
    assert r.exit_code == 0, r.output
    assert f"feature tables go to {tmp_path / 'd.duckdb.features'}" in r.output
    # an S3 features dir is refused (feature tables are written locally)
    r = CliRunner().invoke(main, ["ray", "catalog-init", str(tmp_path / "e.duckdb"), "--metadata", META,
                                  "--storage-options", pool["json"], "--features-dir", "s3://pool/feat"])
    assert r.exit_code == 1 and not (tmp_path / "e.duckdb").exists()
    assert r.output == "error: s3://pool/feat: the features directory must be a local directory\n"


def test_filter_features_use_the_given_options(pool, tmp_path, no_env):
    """The library path of `curate ray run`: open_filter(storage_options=...) builds the text
    features of basic_filter and the CLD3 labels of laion2b from the S3 pool with those options."""
    from curate.run.query import open_filter

    repo = Path(__file__).resolve().parents[2]
    cat, feats = _catalog(pool, tmp_path)
    for flt, view in (("basic_filter", "text_features"), ("laion2b", "text_lang_cld3")):
        opened = open_filter(repo / "filters" / f"{flt}.sql", cat, storage_options=pool["opts"])
        try:
            assert opened.features[view]["built_now"] is True
        finally:
            opened.con.close()
        assert len(list((feats / view).glob("*.parquet"))) == 2


@pytest.mark.parametrize("flt", ["basic_filter", "laion2b"])
def test_ray_run_with_command_line_options_only(ray_session, pool, tmp_path, no_env, flt):
    ref = init_catalog(tmp_path / "local.duckdb", pool=pool["root"] / "pool", features_dir=tmp_path / "local.feat")
    r = CliRunner().invoke(main, ["run", flt, "-c", str(ref), "-o", str(tmp_path / "local.npy")])
    assert r.exit_code == 0, r.output
    cat, feats = _catalog(pool, tmp_path)
    r = CliRunner().invoke(main, ["ray", "run", flt, "-c", str(cat), "-o", str(tmp_path / "s3.npy"),
                                  "--storage-options", pool["json"]])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s3.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    assert f"on catalog {cat}\n" in r.output


def test_ray_features_text_with_command_line_options_only(ray_session, pool, tmp_path, no_env):
    ref = init_catalog(tmp_path / "local.duckdb", pool=pool["root"] / "pool", features_dir=tmp_path / "local.feat")
    r = CliRunner().invoke(main, ["features", "text", str(ref)])
    assert r.exit_code == 0, r.output
    cat, feats = _catalog(pool, tmp_path)
    r = CliRunner().invoke(main, ["ray", "features-text", "-c", str(cat), "--storage-options", pool["json"]])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("text_features: computed 2 file(s) (240 captions), 0 up to date")
    assert f"on catalog {cat}\n" in r.output
    names = sorted(p.name for p in (tmp_path / "local.feat" / "text_features").glob("*.parquet"))
    assert len(names) == 2 and sorted(p.name for p in (feats / "text_features").glob("*.parquet")) == names
    for n in names:
        a, b = pq.read_table(tmp_path / "local.feat" / "text_features" / n), pq.read_table(feats / "text_features" / n)
        assert a.equals(b)
    # without the options nothing can read the pool: the command fails with one error line
    r = CliRunner().invoke(main, ["ray", "features-text", "-c", str(cat), "--force"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"error: {META}/") and ": no credentials to read it (" in r.output, r.output
    assert "pass --storage-options JSON" in r.output and len(r.output.splitlines()) == 1
