"""curate tic attach: TiC artifacts -> timesplit / tic_yearly / tic_eval views, and every bad input.

Expected values come from the generator's documented rule recomputed here with hashlib (md5 of
seed || uid: chars 0-8 pick the month, 8-16 the eval role, 16-24 the class), not from the code
under test; ImageNet class ids are line numbers of timm's synset file, read directly.
"""

import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curate.catalog.connection import connect
from curate.errors import CurateError
from curate.tic import MONTHLY_DIR, YEARLY_DIR
from curate.tic.artifacts import make_tic_artifacts
from curate.tic.attach import attach
from tests.conftest import uid_of

N = 400
# TiC's snapshot months as the generator uses them: 2014-03..2022-12 without 2014-05/06 and 2022-02..04
MONTHS = [y * 100 + m for y in range(2014, 2023) for m in range(1, 13)
          if not (y == 2014 and m in (1, 2, 5, 6)) and not (y == 2022 and m in (2, 3, 4))]


def imagenet_wnids():
    import importlib.util

    root = Path(list(importlib.util.find_spec("timm").submodule_search_locations)[0])
    return (root / "data" / "_info" / "imagenet_synsets.txt").read_text().split()


def expected(uid, seed=0, rf=0.05, df=0.05, n_classes=10):
    """(yyyymm, task, wnid) of a uid under the generator's rule."""
    h = hashlib.md5(f"{seed}{uid}".encode()).hexdigest()
    yyyymm = MONTHS[int(h[0:8], 16) % len(MONTHS)]
    r = int(h[8:16], 16) / 2**32
    k = int(h[16:24], 16) % n_classes
    task = "retrieval" if r < rf else "datacompnet" if r < rf + df else None
    wnid = imagenet_wnids()[k * (1000 // n_classes)] if task == "datacompnet" else None
    return yyyymm, task, wnid


def pool_uids(n=N):
    return [uid_of(i) for i in range(n)]


def pairs(uids):
    rec = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids), dtype="u8,u8")
    return rec


@pytest.fixture
def tic_pool(make_catalog, tmp_path):
    """A 400-row catalog and TiC artifacts for it (monthly .npy)."""
    rows = [{"uid": u} for u in pool_uids()]
    cat = make_catalog([rows[:250], rows[250:]])
    art = tmp_path / "art"
    make_tic_artifacts(cat, art)
    return cat, art


def test_timesplit_and_eval_match_the_rule(tic_pool):
    cat, art = tic_pool
    res = attach(cat, art)
    assert res.mismatches == []
    con = connect(cat)
    ts = {u: (y, m) for u, y, m in con.execute("SELECT uid, year, month FROM timesplit").fetchall()}
    ev = con.execute("SELECT uid, task, year, wnid, class_id FROM tic_eval").fetchall()
    yearly = dict(con.execute("SELECT year, count(*) FROM tic_yearly GROUP BY year").fetchall())
    con.close()
    wnids = imagenet_wnids()
    want_ts, want_ev, want_yearly = {}, set(), {}
    for u in pool_uids():
        yyyymm, task, wnid = expected(u)
        want_ts[u] = (yyyymm // 100, yyyymm % 100)
        if task:
            want_ev.add((u, task, yyyymm // 100, wnid, wnids.index(wnid) if wnid else None))
        else:
            want_yearly[yyyymm // 100] = want_yearly.get(yyyymm // 100, 0) + 1
    assert ts == want_ts  # monthly files include eval uids
    assert set(ev) == want_ev and len(ev) == len(want_ev)
    assert yearly == want_yearly  # yearly files exclude them
    assert {t for _, t, *_ in ev} == {"retrieval", "datacompnet"}
    con = connect(cat)
    classes = con.execute("SELECT class_id, wnid FROM imagenet_classes ORDER BY class_id").fetchall()
    con.close()
    assert classes == list(enumerate(wnids)) and classes[0] == (0, "n01440764") and len(classes) == 1000


def test_monthly_tar_archives_give_the_same_views(make_catalog, tmp_path):
    rows = [{"uid": u} for u in pool_uids(120)]
    cat = make_catalog([rows])
    make_tic_artifacts(cat, tmp_path / "a", monthly="tar", formats=("pkl",))
    attach(cat, tmp_path / "a")
    con = connect(cat)
    ts = dict((u, (y, m)) for u, y, m in con.execute("SELECT * FROM timesplit").fetchall())
    n_eval = con.execute("SELECT count(*) FROM tic_eval").fetchone()[0]
    con.close()
    assert ts == {u: (expected(u)[0] // 100, expected(u)[0] % 100) for u in pool_uids(120)}
    assert n_eval == sum(1 for u in pool_uids(120) if expected(u)[1])  # read from the pickles


def test_rerun_resumes_and_new_input_is_reconverted(tic_pool):
    cat, art = tic_pool
    attach(cat, art)
    con = connect(cat)
    from curate.catalog.connection import features_dir

    fdir = features_dir(con, cat) / "tic"
    con.close()
    files = sorted((fdir / "monthly").glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    attach(cat, art)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    # a changed input file is converted again
    one = sorted((art / MONTHLY_DIR).glob("*.npy"))[0]
    data = one.read_bytes()
    one.write_bytes(data)  # same content, new mtime
    import os

    os.utime(one, ns=(1, 1))
    attach(cat, art)
    assert (fdir / "monthly" / f"{one.stem}.parquet").stat().st_mtime_ns != before[fdir / "monthly" / f"{one.stem}.parquet"]


def test_yearly_only_gives_null_months(tic_pool):
    cat, art = tic_pool
    import shutil

    shutil.rmtree(art / MONTHLY_DIR)
    attach(cat, art)
    con = connect(cat)
    n, months = con.execute("SELECT count(*), count(month) FROM timesplit").fetchone()
    con.close()
    assert months == 0 and n == sum(1 for u in pool_uids() if expected(u)[1] is None)


def test_json_is_preferred_over_a_hostile_pickle(tic_pool):
    cat, art = tic_pool

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (art / "tic-datacomp_retrieval_evals_year2uids.pkl").write_bytes(pickle.dumps({2016: [Evil()]}))
    res = attach(cat, art)
    assert res.sources["retrieval"].endswith(".json")


# ------------------------------------------------------------------------------ bad input

def _set_json(path, obj):
    path.write_text(json.dumps(obj))


def _drop_json(art):
    for f in art.glob("*.json"):
        f.unlink()


BAD = {
    "pickle-with-code": (
        lambda art: (_drop_json(art), (art / "tic-datacomp_retrieval_evals_year2uids.pkl").write_bytes(
            b"cos\nsystem\n(S'echo hi'\ntR.")),
        r"tic-datacomp_retrieval_evals_year2uids.pkl: refusing to load os.system"),
    "uid-wrong-length": (
        lambda art: _set_json(art / "tic-datacomp_retrieval_evals_year2uids.json", {"2016": [uid_of(1), "abc123"]}),
        r"year 2016: uid #1 'abc123' is not 32 hexadecimal characters"),
    "uid-not-a-string": (
        lambda art: _set_json(art / "tic-datacomp_retrieval_evals_year2uids.json", {"2016": [12]}),
        r"year 2016: uid #0 is 12"),
    "eval-year-out-of-range": (
        lambda art: _set_json(art / "tic-datacomp_retrieval_evals_year2uids.json", {"2031": [uid_of(1)]}),
        r"key '2031': year 2031 is out of range 2014..2023"),
    "eval-year-not-a-year": (
        lambda art: _set_json(art / "tic-datacompnet_year2uids.json", {"recent": {}}),
        r"key 'recent': 'recent' is not a year"),
    "wnid-not-imagenet-1k": (
        lambda art: _set_json(art / "tic-datacompnet_year2uids.json", {"2016": {"n99999999": [uid_of(1)]}}),
        r"year 2016: 'n99999999' is not an ImageNet-1k wnid"),
    "yearly-file-out-of-range": (
        lambda art: (art / YEARLY_DIR / "2013.npy").write_bytes((art / YEARLY_DIR / "2014.npy").read_bytes()),
        r"2013.npy: year 2013 is out of range"),
    "sizes-mismatch": (
        lambda art: _set_json(art / YEARLY_DIR / "sizes.json",
                              {**json.loads((art / YEARLY_DIR / "sizes.json").read_text()), "2016": 1}),
        r"2016.npy: holds \d+ uids but sizes.json says 1"),
    "month-listed-but-missing": (
        lambda art: (art / MONTHLY_DIR / "201610.npy").unlink(),
        r"month 201610 is listed in sizes.json but has no 201610.npy"),
    "month-13": (
        lambda art: (art / MONTHLY_DIR / "201613.npy").write_bytes((art / MONTHLY_DIR / "201610.npy").read_bytes()),
        r"201613.npy: month 13 of '201613' is out of range 01..12"),
    "not-a-uid-file": (
        lambda art: np.save(art / YEARLY_DIR / "2016.npy", np.arange(3)),
        r"2016.npy: dtype .* is not a uid file"),
    "no-sizes-json": (
        lambda art: (art / YEARLY_DIR / "sizes.json").unlink(),
        r"sizes.json not found"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(tic_pool, case):
    cat, art = tic_pool
    damage, message = BAD[case]
    damage(art)
    with pytest.raises(CurateError, match=message):
        attach(cat, art)


def _tar_artifacts(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": u} for u in pool_uids(120)]])
    art = tmp_path / "t"
    make_tic_artifacts(cat, art, monthly="tar")
    return cat, art


def _rewrite_tar(path, keep, extra=None):
    src = tarfile.open(path)
    members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile() and keep(m.name)]
    src.close()
    import io

    with tarfile.open(path, "w") as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data))
        for info in extra or []:
            out.addfile(info)


def test_monthly_archive_missing_a_month(make_catalog, tmp_path):
    cat, art = _tar_artifacts(make_catalog, tmp_path)
    _rewrite_tar(art / MONTHLY_DIR / "2017.tar", keep=lambda n: not n.endswith("201705.npy"))
    with pytest.raises(CurateError, match=r"2017.tar: month 201705 is listed in sizes.json but missing from the archive"):
        attach(cat, art)


def test_monthly_archive_with_a_symlink_member_is_refused(make_catalog, tmp_path):
    cat, art = _tar_artifacts(make_catalog, tmp_path)
    link = tarfile.TarInfo("2017/201799.npy")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    _rewrite_tar(art / MONTHLY_DIR / "2017.tar", keep=lambda n: True, extra=[link])
    with pytest.raises(CurateError, match=r"member '2017/201799.npy' is a link or device"):
        attach(cat, art)
    assert not (Path.cwd() / "2017").exists()  # nothing is ever extracted


def test_monthly_archive_of_another_year(make_catalog, tmp_path):
    cat, art = _tar_artifacts(make_catalog, tmp_path)
    (art / MONTHLY_DIR / "2017.tar").rename(art / MONTHLY_DIR / "2016.tar")
    with pytest.raises(CurateError, match=r"2016.tar: member '2017/2017\d\d.npy' is a month of 2017, not of 2016"):
        attach(cat, art)


def test_month_given_twice(make_catalog, tmp_path):
    cat, art = _tar_artifacts(make_catalog, tmp_path)
    with tarfile.open(art / MONTHLY_DIR / "2017.tar") as t:
        (art / MONTHLY_DIR / "201703.npy").write_bytes(t.extractfile("2017/201703.npy").read())
    with pytest.raises(CurateError, match=r"2017.tar: month 201703 is also given"):
        attach(cat, art)


def test_missing_dir_and_empty_dir(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": uid_of(1)}]])
    with pytest.raises(CurateError, match="TiC artifact directory not found"):
        attach(cat, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no tic-datacomp_training_yearly_noeval/ or"):
        attach(cat, tmp_path / "empty")
