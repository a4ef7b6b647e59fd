"""Every command that replaces an output directory (issue 16 §3): the new output is built beside
the old one and swapped in only when complete, so

1. a run failing midway over an earlier complete output leaves it byte-identical, with no
   temporary or half output anywhere near it;
2. a directory holding a file the command did not write is refused in one line (nothing
   changed), or, where the directory is shared by design (``tic export``'s, which also holds
   ``tic prepare``'s data dirs), the file is left untouched;
3. the normal re-run still works.

``curate reshard`` (the model of this rule) has its own tests in tests/shards.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from curate.catalog.connection import init_catalog
from curate.cli import main
from curate.errors import CurateError

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
                    "53de0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082")


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.exit_code, r.output


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too), relative path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Build / trash directories and temporary files of out, beside it and inside it."""
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    inside = [p.relative_to(out).as_posix() for p in out.rglob("*")
              if re.search(r"\.curate-(new|old)$|\.tmp$", p.name)] if out.is_dir() else []
    return beside + inside


# -- the commands ------------------------------------------------------------------------------

@dataclass
class Case:
    """``setup(tmp)`` -> state; ``run(state, fail)`` -> (exit code, output) of the command,
    failing midway when ``fail``; ``out(state)``: the output directory; ``foreign``: where an
    unrelated file is put (relative to out); ``kept``: whether the command leaves it alone
    instead of refusing; ``check(state)``: the complete output is right."""

    name: str
    setup: Callable
    run: Callable
    out: Callable
    foreign: str
    check: Callable
    kept: bool = False
    fail_message: str = ""


# pool export-splits: a catalog whose pool has time_utc; a failing run meets a period that cannot
# be a directory name (the last one in order, so every other period was written first)

def _periods_setup(tmp):
    from tests.pool.test_recipes import time_catalog

    from curate.pool.recipes.periods import create_time_views

    cat, _ = time_catalog(tmp, {2015: 3, 2016: 5, 2017: 4})
    create_time_views(cat)
    return {"cat": cat, "out": tmp / "splits"}


def _periods_run(s, fail):
    if fail:
        con = duckdb.connect(str(s["cat"]))  # the test's own edit of its catalog
        con.execute("CREATE OR REPLACE TABLE __ps AS SELECT * FROM period_split")
        # other contents than the first run's (test splits emptied), then the bad period
        con.execute("CREATE OR REPLACE VIEW period_split AS SELECT * FROM __ps WHERE split = 'train' UNION ALL "
                    "(SELECT * REPLACE ('zz/bad' AS period) FROM __ps LIMIT 1)")
        con.close()
    return cli("pool", "export-splits", s["cat"], "--out", s["out"])


def _periods_check(s):
    sizes = json.loads((s["out"] / "sizes.json").read_text())
    assert sorted(sizes) == ["2015", "2016", "2017"]
    assert sum(v["train"] + v["test"] for v in sizes.values()) == 12


# tic export: attached TiC artifacts; a failing run asks for the eval sets of a catalog with no
# shard directory, which fails after every split file was written

def _tic_setup(tmp):
    from curate.tic.artifacts import make_tic_artifacts
    from curate.tic.attach import attach
    from tests.conftest import pool_table
    from tests.tic.test_attach import pool_uids

    import pyarrow.parquet as pq

    rows = [{"uid": u} for u in pool_uids(200)]
    meta = tmp / "pool" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(pool_table(rows), meta / "0000.parquet")
    cat = init_catalog(tmp / "pool" / "c.duckdb", pool=tmp / "pool")
    make_tic_artifacts(cat, tmp / "art")
    attach(cat, tmp / "art")
    return {"cat": cat, "out": tmp / "tic"}


def _tic_run(s, fail):
    return cli("tic", "export", s["cat"], "--out", s["out"], "--eval-sets" if fail else "--no-eval-sets")


def _tic_check(s):
    out = s["out"]
    assert json.loads((out / "export.json").read_text())["yearly"]
    assert (out / "yearly" / "sizes.json").is_file() and (out / "eval" / "alluids.npy").is_file()


# clusters import --overwrite: centroids as .npy; a failing run breaks down while writing the new
# set (simulated write failure after the centroids were written)

D = 768


def _clusters_setup(tmp):
    from tests.features.test_embeddings import write_pool

    write_pool(tmp / "p", [6, 5], dims={"l14_img": D})
    cat = init_catalog(tmp / "p" / "cat.duckdb", pool=tmp / "p")
    rng = np.random.default_rng(0)
    np.save(tmp / "c1.npy", rng.normal(size=(4, D)).astype(np.float32))
    np.save(tmp / "c2.npy", rng.normal(size=(5, D)).astype(np.float32))
    code, output = cli("clusters", "import", cat, "--name", "s", "--centroids", tmp / "c1.npy")
    assert code == 0, output
    return {"cat": cat, "out": tmp / "p" / "cat.duckdb.features" / "clusters" / "s", "tmp": tmp}


def _clusters_run(s, fail, monkeypatch=None):
    if fail:
        import curate.features.clusters as C

        def broken(path, name, ids):
            raise C.ClusterError(f"{path}: cannot write (simulated: disk full)")

        monkeypatch.setattr(C, "_write_targets", broken)
    return cli("clusters", "import", s["cat"], "--name", "s", "--centroids", s["tmp"] / "c2.npy", "--overwrite")


def _clusters_check(s):
    assert json.loads((s["out"] / "set.json").read_text())["k"] in (4, 5)
    from curate.features.clusters import get_cluster_set

    assert get_cluster_set(s["cat"], "s").name == "s"


# eval-export-winogavil: rows as the HF dataset yields them; a failing run meets a row whose
# candidates and images do not match after a full shard was written (the function the command
# calls, fed rows directly: the HF copy reader has its own tests)

def _wino_rows(n, bad_at=None):
    for i in range(n):
        imgs = [PNG, PNG] if i != bad_at else [PNG]
        yield {"cue": f"cue{i}", "candidates": ["a", "b"], "associations": ["a"], "candidate_images": imgs}


def _wino_setup(tmp):
    return {"out": tmp / "evaldata" / "wds_misc-winogavil_test"}


def _wino_run(s, fail):
    from curate.evaluate.winogavil import export_winogavil

    try:
        n = export_winogavil(_wino_rows(7, bad_at=5 if fail else None), s["out"], shard_size=2)
    except CurateError as e:
        return 1, f"error: {e}\n"
    return 0, f"wrote {n}\n"


def _wino_check(s):
    assert (s["out"] / "count.txt").read_text() == "7\n"
    assert (s["out"] / "test" / "nshards.txt").read_text() == "4\n"


CASES = [
    Case("pool export-splits", _periods_setup, _periods_run, lambda s: s["out"], "notes.txt", _periods_check,
         fail_message="period 'zz/bad' cannot be a directory name"),
    Case("tic export", _tic_setup, _tic_run, lambda s: s["out"], "yearly/notes.txt", _tic_check,
         fail_message="no pool shard directory"),
    Case("clusters import --overwrite", _clusters_setup, _clusters_run, lambda s: s["out"], "notes.txt",
         _clusters_check, fail_message="simulated: disk full"),
    Case("eval-export-winogavil", _wino_setup, _wino_run, lambda s: s["out"], "test/notes.txt", _wino_check,
         fail_message="WinoGAViL row 5: 2 candidates but 1 images"),
]


def _run(case, s, fail, monkeypatch):
    if case.name.startswith("clusters"):
        return case.run(s, fail, monkeypatch)
    return case.run(s, fail)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_failed_run_leaves_the_earlier_output_byte_identical(case, tmp_path, monkeypatch):
    s = case.setup(tmp_path)
    code, output = _run(case, s, False, monkeypatch)
    assert code == 0, output
    out = case.out(s)
    case.check(s)
    before = snapshot(out)
    code, output = _run(case, s, True, monkeypatch)
    assert code == 1, output
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and case.fail_message in lines[-1], output
    assert "Traceback" not in output
    assert snapshot(out) == before
    assert leftovers(out) == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unrelated_file_is_refused_or_left_alone(case, tmp_path, monkeypatch):
    s = case.setup(tmp_path)
    code, output = _run(case, s, False, monkeypatch)
    assert code == 0, output
    out = case.out(s)
    f = out / case.foreign
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"my notes, not curate's\n")
    before = snapshot(out)
    code, output = _run(case, s, False, monkeypatch)
    assert code == 1, output
    line = output.strip().splitlines()[-1]
    assert line.startswith("error: ") and case.foreign in line and "was not written by" in line, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert snapshot(out) == before
    assert leftovers(out) == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rerun_replaces_the_output(case, tmp_path, monkeypatch):
    s = case.setup(tmp_path)
    code, output = _run(case, s, False, monkeypatch)
    assert code == 0, output
    first = snapshot(case.out(s))
    code, output = _run(case, s, False, monkeypatch)
    assert code == 0, output
    case.check(s)
    assert leftovers(case.out(s)) == []
    if not case.name.startswith("clusters"):  # same inputs, same bytes (a cluster set records its time)
        assert {k: v for k, v in snapshot(case.out(s)).items() if k != "export.json"} == \
            {k: v for k, v in first.items() if k != "export.json"}


def test_tic_export_leaves_other_entries_of_its_directory_alone(tmp_path):
    """OUT also holds tic prepare's data dirs and the user's files: only the export's own entries
    (yearly/, monthly/, eval/, filter/, export.json) are replaced; a stale split file of an
    earlier export does not survive."""
    s = _tic_setup(tmp_path)
    out = s["out"]
    (out / "train" / "2016").mkdir(parents=True)
    (out / "train" / "2016" / "00000000.tar").write_bytes(b"prepared data")
    (out / "README.txt").write_text("mine\n")
    code, output = _tic_run(s, False)
    assert code == 0, output
    (out / "yearly" / "1999.npy").write_bytes((out / "yearly" / sorted(snapshot(out / "yearly"))[0]).read_bytes())
    code, output = _tic_run(s, False)
    assert code == 0, output
    assert (out / "train" / "2016" / "00000000.tar").read_bytes() == b"prepared data"
    assert (out / "README.txt").read_text() == "mine\n"
    assert not (out / "yearly" / "1999.npy").exists()
    assert leftovers(out) == []


def test_killed_swap_is_finished_by_the_next_run(tmp_path):
    """A run killed between moving the old output aside and moving the new one in (the new one
    is complete by then) is finished by the next call; a killed build is dropped."""
    from curate.atomic import replace_dir

    owned = re.compile(r"[a-z]\.txt")
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("old")
    new, old = tmp_path / ".o.curate-new", tmp_path / ".o.curate-old"
    new.mkdir()
    (new / "a.txt").write_text("new")
    out.rename(old)  # killed here
    with replace_dir(out, owned) as build:
        assert out.is_dir() and (out / "a.txt").read_text() == "new" and not old.exists()
        (build / "b.txt").write_text("newer")
    assert snapshot(out) == {"b.txt": b"newer"} and leftovers(out) == []
    # a killed build (no old output moved aside) is dropped, the output kept
    new.mkdir()
    (new / "half.txt").write_text("half")
    with pytest.raises(RuntimeError):
        with replace_dir(out, owned) as build:
            assert not (build / "half.txt").exists()
            raise RuntimeError("fails")
    assert snapshot(out) == {"b.txt": b"newer"} and leftovers(out) == []


# byod score --overwrite (torch and open_clip: a tiny random-init model, as tests/pool/test_byod.py)

def _byod_setup(tmp):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from tests.pool.test_byod import TINY, small_shards

    cfg = tmp / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    ckpt = tmp / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    shards = small_shards(tmp, n=6)
    code, output = cli("byod", "score", "--data-dir", shards.parent, "--model-config", cfg, "--checkpoint", ckpt)
    assert code == 0, output
    return {"data": shards.parent, "cfg": cfg, "ckpt": ckpt, "out": shards.parent / "metadata_scored"}


def _byod_run(s, fail=False):
    if fail:  # shard 1's first image becomes undecodable: fails after shard 0 was rescored
        tar = s["data"] / "shards" / "00000001.tar"
        with tarfile.open(tar) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        first = next(m.name for m, _ in members if m.name.endswith(".jpg"))
        with tarfile.open(tar, "w") as tf:
            for m, data in members:
                data = b"\xff\xd8 not a jpeg" if m.name == first else data
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
    return cli("byod", "score", "--data-dir", s["data"], "--model-config", s["cfg"], "--checkpoint", s["ckpt"],
               "--overwrite")


OWN_BYOD = [".byod_model.json", "00000000.npz", "00000000.parquet", "00000001.npz", "00000001.parquet"]


@pytest.mark.parametrize("mode", ["fail", "foreign", "rerun"])
def test_byod_score_overwrite(mode, tmp_path):
    s = _byod_setup(tmp_path)
    out = s["out"]
    if mode == "foreign":
        (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    code, output = _byod_run(s, fail=mode == "fail")
    assert "Traceback" not in output
    if mode == "rerun":
        assert code == 0, output
        assert sorted(snapshot(out)) == OWN_BYOD and "scored 2 shards (0 already done)" in output
    else:
        assert code == 1, output
        line = output.strip().splitlines()[-1]
        want = "is not a decodable image" if mode == "fail" else "notes.txt was not written by curate byod score"
        assert line.startswith("error: ") and want in line, output
        assert snapshot(out) == before
    assert leftovers(out) == []


# tic prepare --overwrite: its data dirs are reshard outputs (curate.shards.reshard's rule, one
# multi-output job: every dir swapped in only when all are complete)

@pytest.mark.parametrize("mode", ["fail", "foreign", "rerun"])
def test_tic_prepare_overwrite(mode, tmp_path):
    import shutil

    from curate.tic.artifacts import make_tic_artifacts
    from curate.tic.attach import attach
    from curate.tic.plan import make_plan, write_plan
    from tests.conftest import REPO

    root = tmp_path
    shards = root / "shards"
    shutil.copytree(REPO / "data" / "sample_pool" / "shards", shards)
    cat = init_catalog(root / "c.duckdb", pool=REPO / "data" / "sample_pool")
    make_tic_artifacts(cat, root / "art")
    attach(cat, root / "art")
    code, output = cli("tic", "export", cat, "--out", root / "tic", "--no-eval-sets")
    assert code == 0, output
    sizes = json.loads((root / "tic" / "yearly" / "sizes.json").read_text())
    write_plan(make_plan("cumulative-exp", [2016, 2017], 100, sizes, export_dir="tic"), root / "plan.json")
    args = ["tic", "prepare", root / "plan.json", "--catalog", cat, "--shards", shards, "--root", root,
            "--workers", "1", "--overwrite"]
    code, output = cli(*args)
    assert code == 0, output
    data = root / "tic" / "train"
    if mode == "foreign":
        (data / "2016" / "notes.txt").write_text("mine\n")
    if mode == "fail":  # a member header in the middle of an input tar is garbage (same size)
        tar = sorted(shards.glob("*.tar"))[0]
        with tarfile.open(tar) as tf:
            offset = tf.getmembers()[len(tf.getmembers()) // 2].offset
        raw = bytearray(tar.read_bytes())
        raw[offset:offset + 512] = b"x" * 512
        tar.write_bytes(bytes(raw))
    before = snapshot(root / "tic")
    code, output = cli(*args)
    assert "Traceback" not in output
    if mode == "rerun":
        assert code == 0, output
        assert snapshot(root / "tic") == before  # same job, same bytes
    else:
        assert code == 1, output
        line = output.strip().splitlines()[-1]
        assert line.startswith("error: ") and ("notes.txt" in line if mode == "foreign" else tar.name in line), output
        assert snapshot(root / "tic") == before
    for d in data.iterdir():
        assert leftovers(d) == []
