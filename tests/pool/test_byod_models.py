"""`curate byod score` accepts the model specifications `curate train` uses (issue 18): the
repository's train/models/ names, `local-dir:` names, and the wrapped `open_clip_config.json`
format, and it does not warn about random initialisation when a checkpoint follows."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from curate.errors import CurateError  # noqa: E402
from curate.pool.byod import load_model, model_name  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY_DIR = REPO / "train" / "models" / "tiny-vit"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyvit")
    torch.manual_seed(3)
    model = open_clip.create_model(f"local-dir:{TINY_DIR}")
    ckpt = d / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt, {k: v.clone() for k, v in model.state_dict().items()}


def _specs(tmp_path):
    wrapped = tmp_path / "mytiny.json"
    shutil.copy(TINY_DIR / "open_clip_config.json", wrapped)
    return [("tiny-vit", None), (f"local-dir:{TINY_DIR}", None), (str(TINY_DIR), None),
            (None, TINY_DIR / "open_clip_config.json"), (None, wrapped)]


def test_every_spec_loads_the_checkpoint_weights(tiny_ckpt, tmp_path, caplog):
    ckpt, state = tiny_ckpt
    for arch, cfg in _specs(tmp_path):
        with caplog.at_level(logging.INFO):
            caplog.clear()
            model, preprocess, tokenizer, name = load_model(arch, ckpt, model_config=cfg)
        got = model.state_dict()
        assert got.keys() == state.keys(), (arch, cfg)
        assert all(torch.equal(got[k], state[k]) for k in state), (arch, cfg)
        assert not [r for r in caplog.records if "pretrained" in r.getMessage().lower()], (arch, cfg)
        assert tokenizer(["a photo"]).shape[-1] == 32  # the tiny config's context length


@pytest.mark.parametrize("arch,cfg,msg", [
    ("no-such-model", None, "--model no-such-model: not an open_clip architecture"),
    ("local-dir:/nonexistent", None, "open_clip_config.json not found"),
    (None, None, "give --model ARCH"),
])
def test_bad_specs_are_one_line(arch, cfg, msg):
    with pytest.raises(CurateError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        model_name(arch, cfg)


def test_wrapped_config_without_model_fields(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_cfg": {"embed_dim": 8}}))
    with pytest.raises(CurateError, match="bad.json: model_cfg lacks vision_cfg, text_cfg"):
        model_name(None, bad)
