"""`curate eval-export-folder` (issue 17): an ImageFolder directory or an image+caption table
becomes a clip_benchmark webdataset that `curate eval` and the real clip_benchmark both read.

Independent sides: the tars are read back with Python's ``tarfile``; the sample order and class
ids are torchvision's ``ImageFolder``'s; the default templates are clip_benchmark's own
``imagenet1k`` list; and the metrics of `curate eval` on an export are compared with those of
clip_benchmark 1.6.2 (``clip_benchmark.cli eval --dataset wds/...``) on the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli.main import main
from tests.conftest import REPO

COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "orange": (250, 140, 10), "red": (230, 20, 30),
           "white": (245, 245, 245)}


def _image(rgb, seed: int, size=(36, 28)) -> Image.Image:
    """A colour with seeded noise (so no two images are equal)."""
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(rgb)[None, None, :] + rng.integers(-25, 26, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(px.astype(np.uint8))


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes, unequal sizes, JPEG/PNG/BMP, a nested folder and a non-image file."""
    src = tmp_path / "val"
    _save(_image(COLOURS["red"], 1), src / "red" / "b.jpg", "JPEG")
    _save(_image(COLOURS["red"], 2), src / "red" / "a.png", "PNG")
    _save(_image(COLOURS["red"], 3), src / "red" / "more" / "c.JPEG", "JPEG")
    _save(_image(COLOURS["blue"], 4), src / "blue" / "x.bmp", "BMP")
    _save(_image(COLOURS["green"], 5), src / "green" / "1.jpg", "JPEG")
    _save(_image(COLOURS["green"], 6), src / "green" / "2.jpg", "JPEG")
    (src / "red" / "notes.txt").write_text("not an image")
    return src


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _members(shard: Path) -> list[tuple[str, bytes, tarfile.TarInfo]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read(), m) for m in tf.getmembers()]


def _all_members(out: Path) -> list[tuple[str, bytes, tarfile.TarInfo]]:
    n = int((out / "test" / "nshards.txt").read_text())
    return [m for i in range(n) for m in _members(out / "test" / f"{i}.tar")]


def _tree_digest(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- classification layout


def test_folder_export_layout_members_and_order(folder, tmp_path):
    out = tmp_path / "evalsets" / "wds_colours_test"
    code, output = _cli("eval-export-folder", folder, out, "--shard-size", "2")
    assert code == 0, output
    assert "wrote 6 images (3 classes, 80 templates) in 3 shards" in output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "classnames.txt", "count.txt", "dataset_type.txt", "test/0.tar", "test/1.tar", "test/2.tar",
        "test/nshards.txt", "zeroshot_classification_templates.txt"]
    assert (out / "classnames.txt").read_text() == "blue\ngreen\nred\n"  # sorted folder names
    assert (out / "test" / "nshards.txt").read_text() == "3\n"
    assert (out / "count.txt").read_text() == "6\n"
    assert (out / "dataset_type.txt").read_text() == "classification\n"
    # by hand: classes blue=0, green=1, red=2; within red, os.walk order: a.png, b.jpg, then more/c.JPEG
    expected = [("blue/x.bmp", 0), ("green/1.jpg", 1), ("green/2.jpg", 1), ("red/a.png", 2), ("red/b.jpg", 2),
                ("red/more/c.JPEG", 2)]
    from torchvision.datasets import ImageFolder

    assert [(Path(p).relative_to(folder).as_posix(), c) for p, c in ImageFolder(str(folder)).samples] == expected
    members = _all_members(out)
    names = [n for n, _, _ in members]
    assert names == ["s0000000.png", "s0000000.cls", "s0000001.jpg", "s0000001.cls", "s0000002.jpg", "s0000002.cls",
                     "s0000003.png", "s0000003.cls", "s0000004.jpg", "s0000004.cls", "s0000005.jpg", "s0000005.cls"]
    data = dict((n, d) for n, d, _ in members)
    for i, (rel, cls) in enumerate(expected):
        assert data[f"s{i:07d}.cls"] == str(cls).encode()
        img_name = next(n for n in names if n.startswith(f"s{i:07d}.") and not n.endswith(".cls"))
        if rel.endswith(".bmp"):  # re-encoded losslessly as PNG
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data[img_name]))),
                                  np.asarray(Image.open(folder / rel)))
        else:  # JPEG / PNG bytes copied as they are
            assert data[img_name] == (folder / rel).read_bytes()
    # fixed tar metadata (deterministic bytes)
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for _, _, m in members} == {(0, 0, 0, 0o444, "")}
    # three shards of 2 samples: shard 1 holds samples 2 and 3
    assert [n for n, _, _ in _members(out / "test" / "1.tar")] == ["s0000002.jpg", "s0000002.cls",
                                                                   "s0000003.png", "s0000003.cls"]


def test_default_templates_are_clip_benchmarks_imagenet_templates(folder, tmp_path, clip_benchmark_python):
    out = tmp_path / "o"
    assert _cli("eval-export-folder", folder, out)[0] == 0
    ref = subprocess.run([clip_benchmark_python, "-c",
                          "import json, os, clip_benchmark.datasets as d; print(json.dumps(json.load(open("
                          "os.path.join(os.path.dirname(d.__file__), 'en_zeroshot_classification_templates.json')))"
                          "['imagenet1k']))"], check=True, capture_output=True, text=True).stdout
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == json.loads(ref)
    assert len(json.loads(ref)) == 80


def test_same_input_gives_the_same_bytes_and_hidden_entries_are_skipped(folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli("eval-export-folder", folder, a)[0] == 0
    # hidden folders and files (notebook checkpoints, .DS_Store) are not classes or images
    _save(_image(COLOURS["white"], 9), folder / ".ipynb_checkpoints" / "z.jpg", "JPEG")
    _save(_image(COLOURS["white"], 10), folder / "red" / ".cache" / "z.jpg", "JPEG")
    _save(_image(COLOURS["white"], 11), folder / "red" / ".hidden.jpg", "JPEG")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    assert _cli("eval-export-folder", folder, b)[0] == 0
    assert _tree_digest(a) == _tree_digest(b)
    assert len(_tree_digest(a)) == 6


def test_classnames_mapping_and_templates_file(tmp_path):
    src = tmp_path / "imagenet_val"
    for i, wnid in enumerate(["n01440764", "n01443537"]):
        _save(_image(COLOURS["red" if i else "blue"], i), src / wnid / f"ILSVRC2012_val_0000000{i}.JPEG", "JPEG")
    # without a mapping the WordNet ids become the class names, and the user is told
    code, output = _cli("eval-export-folder", src, tmp_path / "plain")
    assert code == 0 and "note: the class folders are WordNet ids" in output
    assert (tmp_path / "plain" / "classnames.txt").read_text() == "n01440764\nn01443537\n"
    # 'WNID NAME' lines (extra entries for absent folders are ignored, comments skipped)
    (tmp_path / "map.txt").write_text("# wnid name\nn01443537 goldfish\nn01440764   tench\nn99999999 other thing\n")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\n  itap of a {c}.  \n")
    code, output = _cli("eval-export-folder", src, tmp_path / "named", "--classnames", tmp_path / "map.txt",
                        "--templates", tmp_path / "t.txt")
    assert code == 0, output
    assert "WordNet" not in output and "(2 classes, 2 templates)" in output
    assert (tmp_path / "named" / "classnames.txt").read_text() == "tench\ngoldfish\n"
    assert (tmp_path / "named" / "zeroshot_classification_templates.txt").read_text() == \
        "a photo of a {c}.\nitap of a {c}.\n"
    # a JSON object works the same
    (tmp_path / "map.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    assert _cli("eval-export-folder", src, tmp_path / "js", "--classnames", tmp_path / "map.json")[0] == 0
    assert (tmp_path / "js" / "classnames.txt").read_text() == "tench\ngoldfish\n"


# --------------------------------------------------------------------------- retrieval layout


def test_caption_table_csv(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(3):
        _save(_image(COLOURS["green"], 20 + i), imgs / f"{i}.png", "PNG")
    table = tmp_path / "caps.csv"
    # image 1 has two rows (two captions); a quoted caption holds a line break; rows out of order
    table.write_text('filepath,caption,extra\n'
                     'imgs/1.png,a green square,x\n'
                     'imgs/0.png,"two\nlines",y\n'
                     'imgs/1.png,another caption,z\n'
                     'imgs/2.png,third,w\n')
    out = tmp_path / "wds_caps_test"
    code, output = _cli("eval-export-folder", table, out, "--shard-size", "2")
    assert code == 0, output
    assert "wrote 3 images (4 captions) in 2 shards" in output
    assert "clip_benchmark: --dataset wds/caps --dataset_root" in output and "--task zeroshot_retrieval" in output
    assert sorted(p.name for p in out.iterdir()) == ["count.txt", "dataset_type.txt", "test"]
    assert (out / "dataset_type.txt").read_text() == "retrieval\n"
    members = _all_members(out)
    data = dict((n, d) for n, d, _ in members)
    assert [n for n, _, _ in members] == ["s0000000.png", "s0000000.txt", "s0000001.png", "s0000001.txt",
                                          "s0000002.png", "s0000002.txt"]
    # images in order of first appearance; captions in row order; a line break written as \n
    assert data["s0000000.png"] == (imgs / "1.png").read_bytes()
    assert data["s0000000.txt"] == b"a green square\nanother caption"
    assert data["s0000001.png"] == (imgs / "0.png").read_bytes()
    assert data["s0000001.txt"] == b"two\\nlines"
    assert data["s0000002.txt"] == b"third"


def test_caption_table_parquet_with_caption_lists(tmp_path):
    imgs = tmp_path / "pics"
    for i in range(2):
        _save(_image(COLOURS["orange"], 30 + i), imgs / f"{i}.jpg", "JPEG")
    table = tmp_path / "meta" / "caps.parquet"
    table.parent.mkdir()
    pq.write_table(pa.table({"img": ["0.jpg", "1.jpg"],
                             "texts": pa.array([["first a", "first b", "first c"], ["second"]])}), table)
    out = tmp_path / "ret"
    code, output = _cli("eval-export-folder", table, out, "--image-column", "img", "--caption-column", "texts",
                        "--image-root", imgs)
    assert code == 0, output
    data = dict((n, d) for n, d, _ in _all_members(out))
    assert data["s0000000.txt"] == b"first a\nfirst b\nfirst c"
    assert data["s0000001.txt"] == b"second"
    assert data["s0000001.jpg"] == (imgs / "1.jpg").read_bytes()


# --------------------------------------------------------------------------- bad input, atomicity


def _bad_cases(tmp_path: Path, folder: Path):
    empty = tmp_path / "empty_class"
    _save(_image(COLOURS["red"], 1), empty / "red" / "a.jpg", "JPEG")
    (empty / "blue").mkdir()
    broken = tmp_path / "broken"
    _save(_image(COLOURS["red"], 1), broken / "red" / "a.jpg", "JPEG")
    (broken / "red" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    nocls = tmp_path / "noclasses"
    nocls.mkdir()
    (nocls / "a.jpg").write_bytes(b"x")
    img = tmp_path / "one.png"
    _image(COLOURS["red"], 1).save(img)
    (tmp_path / "nocol.csv").write_text("image,text_en\none.png,hi\n")
    (tmp_path / "gone.csv").write_text("image,caption\none.png,hi\nmissing.png,there\n")
    (tmp_path / "blank.csv").write_text('image,caption\none.png,hi\none.png,"  "\n')
    (tmp_path / "caps.json").write_text("{}")
    (tmp_path / "map.txt").write_text("green grass\n")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na photo\n")
    return [
        ((empty, "o"), f"{empty / 'blue'}: class folder has no images"),
        ((broken, "o"), f"{broken / 'red' / 'b.jpg'}: not a readable image"),
        ((nocls, "o"), f"{nocls}: no class folders"),
        ((tmp_path / "nocol.csv", "o"), "nocol.csv: missing caption column (none of caption, captions, text; "
                                        "found image, text_en)"),
        ((tmp_path / "nocol.csv", "o", "--caption-column", "txt"), "nocol.csv: missing caption column 'txt'"),
        ((tmp_path / "gone.csv", "o"), f"gone.csv: row 2: image {tmp_path / 'missing.png'} not found"),
        ((tmp_path / "blank.csv", "o"), "blank.csv: row 2: column 'caption' has an empty caption"),
        ((tmp_path / "caps.json", "o"), "caps.json: a caption table is .csv, .tsv or .parquet"),
        ((folder, "o", "--classnames", tmp_path / "map.txt"), "map.txt: no class name for folder 'blue' (and 1 more)"),
        ((folder, "o", "--templates", tmp_path / "t.txt"), "t.txt: template 'a photo' lacks the {c} placeholder"),
        ((folder, "o", "--kind", "retrieval"), "--kind retrieval needs a csv/tsv/parquet table"),
        ((tmp_path / "gone.csv", "o", "--classnames", tmp_path / "map.txt"), "--classnames is for classification"),
        ((folder, "o", "--task", "nope"), "--task 'nope' is not in the task list"),
        ((folder, "o", "--task", "retrieval/flickr_1k_test_image_text_retrieval"),
         "--task retrieval/flickr_1k_test_image_text_retrieval: the task is retrieval, the input makes a "
         "classification set"),
        ((folder, "imagenet", "--task", "imagenet1k"), "reads wds_imagenet1k_test/ under its --data-dir"),
    ]


def test_bad_input_is_one_line(folder, tmp_path):
    for args, message in _bad_cases(tmp_path, folder):
        out = tmp_path / args[1]
        code, output = _cli("eval-export-folder", args[0], out, *args[2:])
        assert code == 1, (args, output)
        lines = [ln for ln in output.splitlines() if ln.strip() and "img/s" not in ln and "it/s" not in ln]
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, output)
        assert "Traceback" not in output
        assert not out.exists() and not list(tmp_path.glob(".*.curate-new")), args


def test_existing_output_is_kept_unless_overwrite(folder, tmp_path):
    out = tmp_path / "out"
    assert _cli("eval-export-folder", folder, out)[0] == 0
    before = _tree_digest(out)
    # a second export without --overwrite changes nothing
    _save(_image(COLOURS["white"], 50), folder / "white" / "w.jpg", "JPEG")
    code, output = _cli("eval-export-folder", folder, out)
    assert code == 1 and "exists; pass --overwrite to replace it" in output
    assert _tree_digest(out) == before
    # a failing export with --overwrite leaves the old output byte for byte, and no temp dir
    (folder / "white" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, output = _cli("eval-export-folder", folder, out, "--overwrite")
    assert code == 1 and "bad.png: not a readable image" in output
    assert _tree_digest(out) == before and not list(tmp_path.glob(".out.curate-*"))
    # --overwrite replaces it
    (folder / "white" / "bad.png").unlink()
    code, output = _cli("eval-export-folder", folder, out, "--overwrite")
    assert code == 0, output
    assert (out / "classnames.txt").read_text() == "blue\ngreen\nred\nwhite\n"
    # a file the export did not write is never removed
    (out / "mine.txt").write_text("keep")
    code, output = _cli("eval-export-folder", folder, out, "--overwrite")
    assert code == 1 and "mine.txt was not written by curate eval-export-folder" in output
    assert (out / "mine.txt").read_text() == "keep"


def test_overwrite_refuses_an_output_holding_the_input(tmp_path):
    out = tmp_path / "set"
    (out / "src").mkdir(parents=True)
    _image(COLOURS["red"], 1).save(out / "src" / "a.png")
    (out / "src" / "caps.csv").write_text("image,caption\na.png,red\n")
    code, output = _cli("eval-export-folder", out / "src" / "caps.csv", out, "--overwrite")
    assert code == 1 and f"{out}: --overwrite refused: it is or contains the input" in output
    assert (out / "src" / "a.png").is_file() and (out / "src" / "caps.csv").is_file()
    # a table elsewhere naming images inside the output: the output holds files the export did
    # not write, so it is not replaced
    (tmp_path / "caps.csv").write_text("image,caption\nset/src/a.png,red\n")
    code, output = _cli("eval-export-folder", tmp_path / "caps.csv", out, "--overwrite")
    assert code == 1 and f"{out}: src/a.png (and 1 more) was not written by curate eval-export-folder" in output
    assert (out / "src" / "a.png").is_file() and not (out / "test").exists()


# --------------------------------------------------------------------------- both readers


def test_documented_imagenet_commands(tmp_path, run_dir, monkeypatch):
    """docs/training.md's commands: an ImageNet-style val folder (WordNet-id folders) with a
    'WNID NAME' mapping, exported for task imagenet1k and evaluated with the default task list."""
    monkeypatch.chdir(tmp_path)
    for i, (wnid, c) in enumerate([("n01440764", "red"), ("n01443537", "green"), ("n01484850", "blue")]):
        for j in range(2):
            _save(_image(COLOURS[c], 10 * i + j), Path("imagenet/val") / wnid / f"ILSVRC2012_val_{i}{j}.JPEG", "JPEG")
    Path("imagenet_classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    code, output = _cli(*"eval-export-folder imagenet/val evalsets/wds_imagenet1k_test --task imagenet1k "
                         "--classnames imagenet_classnames.txt".split())
    assert code == 0, output
    assert "note: task imagenet1k has 1000 classes in the task list, this set 3" in output
    assert "curate eval: --data-dir evalsets --task imagenet1k" in output
    assert Path("evalsets/wds_imagenet1k_test/classnames.txt").read_text() == "tench\ngoldfish\ngreat white shark\n"
    code, output = _cli("eval", "--train-output-dir", run_dir, "--data-dir", "evalsets", "--task", "imagenet1k")
    assert code == 0, output
    line = json.loads((run_dir / "eval_results.jsonl").read_text())
    assert (line["key"], line["n"]) == ("imagenet1k", 6) and line["metrics"]["main_metric"] == line["metrics"]["acc1"]



def _tiny_config_dir(tmp_path: Path) -> Path:
    """The tiny test model as a named open_clip config (what clip_benchmark's loader needs: a
    model name and a checkpoint file); its preprocessing is open_clip's default."""
    from open_clip.transform import PreprocessCfg

    cfg = json.loads((REPO / "train" / "models" / "tiny-vit" / "open_clip_config.json").read_text())
    d = PreprocessCfg()
    pre = cfg["preprocess_cfg"]
    assert (tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"], pre["resize_mode"]) == \
        (d.mean, d.std, d.interpolation, d.resize_mode)
    out = tmp_path / "model_configs"
    out.mkdir()
    (out / "curate-tiny-vit.json").write_text(json.dumps(cfg["model_cfg"]))
    return out


def _clip_benchmark(py: Path, tmp_path: Path, run_dir: Path, name: str, root: Path, *extra) -> dict:
    ckpt = json.loads((run_dir / "info.json").read_text())["checkpoint"]
    result = tmp_path / f"cb_{name}.json"
    wrapper = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
               "from clip_benchmark.cli import main; sys.exit(main())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([py, "-c", wrapper, _tiny_config_dir(tmp_path), "eval", "--dataset", f"wds/{name}",
                        "--dataset_root", root, "--model", "curate-tiny-vit", "--pretrained", ckpt, "--no_amp",
                        "--num_workers", "0", "--batch_size", "4", "--output", result, *extra],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(result.read_text())["metrics"]


def _fit(run_dir: Path, pairs: list[tuple[Path, str]], steps: int = 8) -> None:
    """A few contrastive steps of the tiny model on (image, text) pairs, saved over the run's
    checkpoint: a random model predicts one class for every image, which would make the
    comparison below agree trivially."""
    import torch

    from tests.conftest import open_clip_from_run

    model, pre, tok = open_clip_from_run(run_dir)
    torch.manual_seed(0)
    imgs = torch.stack([pre(Image.open(p)) for p, _ in pairs])
    texts = tok([t for _, t in pairs])
    model.token_embedding.requires_grad_(False)  # 49408 x 64: the slow part, not needed here
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        f_i = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        f_t = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * f_i @ f_t.T
        same = torch.tensor([[a == b for _, b in pairs] for _, a in pairs], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)  # pairs with the same text are all positives
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = json.loads((run_dir / "info.json").read_text())["checkpoint"]
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)


def test_curate_eval_and_clip_benchmark_agree_on_an_exported_folder(tmp_path, run_dir, clip_benchmark_python):
    src = tmp_path / "val"
    sizes = {"blue": 3, "green": 2, "orange": 4, "red": 3, "white": 2}  # unequal: recall differs from acc
    seed = 100
    for c, n in sizes.items():
        for i in range(n):
            seed += 1
            _save(_image(COLOURS[c], seed), src / c / f"{i}.jpg", "JPEG")
    _fit(run_dir, [(p, f"a photo of a {p.parent.name}.") for p in sorted(src.rglob("*.jpg"))], steps=3)
    data = tmp_path / "evalsets"
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na {c} square.\n{c}\n")
    code, output = _cli("eval-export-folder", src, data / "wds_colours_test", "--templates", tmp_path / "t.txt",
                        "--shard-size", "5")
    assert code == 0, output
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("colours:\n  name: Colours\n  main_metric: mean_per_class_recall\n")
    code, output = _cli("eval", "--train-output-dir", run_dir, "--tasks", tasks, "--data-dir", data,
                        "--output-dir", tmp_path / "res")
    assert code == 0, output
    ours = json.loads((tmp_path / "res" / "eval_results.jsonl").read_text())
    assert ours["n"] == 14
    ref = _clip_benchmark(clip_benchmark_python, tmp_path, run_dir, "colours", data / "wds_colours_test",
                          "--task", "zeroshot_classification")
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["metrics"][k] == pytest.approx(ref[k], abs=1e-6), k
    # not a vacuous agreement: better than predicting any one class (the largest has 4 of 14)
    assert ours["metrics"]["acc1"] > 4 / 14


def test_curate_eval_and_clip_benchmark_agree_on_an_exported_caption_table(tmp_path, run_dir,
                                                                          clip_benchmark_python):
    imgs = tmp_path / "imgs"
    rows = []
    for i, c in enumerate(["blue", "green", "orange", "red", "white"] * 3):
        _save(_image(COLOURS[c], 200 + i), imgs / f"{i:02d}.png", "PNG")
        rows += [(f"imgs/{i:02d}.png", f"a {c} picture")] + [(f"imgs/{i:02d}.png", f"{c} number {i}")] * (i % 3 == 0)
    table = tmp_path / "caps.csv"
    table.write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    _fit(run_dir, [(tmp_path / a, b) for a, b in rows])
    data = tmp_path / "evalsets"
    code, output = _cli("eval-export-folder", table, data / "wds_caps_test", "--shard-size", "4")
    assert code == 0, output
    assert "wrote 15 images (20 captions)" in output
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("caps:\n  name: Caps\n  main_metric: mean_recall@1\n  task: retrieval\n")
    code, output = _cli("eval", "--train-output-dir", run_dir, "--tasks", tasks, "--data-dir", data,
                        "--output-dir", tmp_path / "res")
    assert code == 0, output
    ours = json.loads((tmp_path / "res" / "eval_results.jsonl").read_text())["metrics"]
    ref = _clip_benchmark(clip_benchmark_python, tmp_path, run_dir, "caps", data / "wds_caps_test",
                          "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10")
    keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    assert set(keys) <= set(ref)
    for k in keys:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k
    assert ours["image_retrieval_recall@1"] > 3 / 15  # well above chance (1/15): the captions matter
