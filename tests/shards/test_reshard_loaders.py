"""Reshard outputs read by the real consumers: the webdataset library and open_clip's trainer loader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from curate.catalog.connection import EXAMPLE_CATALOG, connect
from curate.engine import Engine
from curate.shards.reshard import reshard
from curate.subset import write_subset
from curate.uids import hex_array_to_pairs, sort_pairs

POOL_SHARDS = Path(__file__).resolve().parents[2] / "data" / "sample_pool" / "shards"


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Every 3rd uid of the bundled pool, the first five twice, in shards of 100."""
    tmp = tmp_path_factory.mktemp("loaders")
    con = connect(EXAMPLE_CATALOG)
    t = con.execute("SELECT uid FROM pool WHERE row % 3 = 0 ORDER BY uid").to_arrow_table()
    con.close()
    hi, lo = hex_array_to_pairs(t.column("uid"))
    hi, lo = sort_pairs(np.concatenate([hi, hi[:5]]), np.concatenate([lo, lo[:5]]))
    sub = write_subset(tmp / "s.npy", hi, lo)
    res = reshard(POOL_SHARDS, tmp / "out", sub, shard_size=100, engine=Engine(workers=2))
    return tmp / "out", res


def test_webdataset_reads_every_sample(resharded):
    import webdataset as wds

    out, res = resharded
    tars = sorted(str(p) for p in out.glob("*.tar"))
    keys, n_img = [], 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        keys.append(sample["__key__"])
        n_img += "jpg" in sample
        meta = json.loads(sample["json"])
        assert sample["__key__"].startswith(meta["uid"] + "-")
        assert sample["txt"].decode() == meta["caption"]
    assert len(keys) == res.output_count == n_img
    assert len(set(keys)) == len(keys)
    assert sum(k.endswith("-1") for k in keys) == 5  # the five uids listed twice


def test_open_clip_wds_loader(resharded):
    pytest.importorskip("open_clip_train")
    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    out, res = resharded
    n = res.output_shard_count
    args = SimpleNamespace(
        train_data=f"{out}/{{00000000..{n - 1:08d}}}.tar", val_data=None, train_num_samples=None,
        dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=16,
        workers=1, world_size=1)
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    # the size came from our sizes.json (no --train-num-samples given)
    assert info.dataloader.num_samples >= res.output_count - 16
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert texts.shape[0] == images.shape[0]
        seen += images.shape[0]
    assert seen == info.dataloader.num_batches * 16
