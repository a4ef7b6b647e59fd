"""``pip install .`` (a real, non-editable wheel) works without the source tree.

The wheel is built from a copy of the project's files (so nothing can come from this checkout),
installed into a fresh virtualenv, and run from an empty temporary directory. The fresh venv
sees this venv's third-party packages through a ``.pth`` line (so no download is needed), but
not this checkout: the ``curate`` it imports is the installed wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["curate", "sql", "filters", "train", "eval", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md"]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in PROJECT_FILES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_bundled"))
        else:
            shutil.copy2(p, src / name)
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(src), "-w", str(dist)], check=True, capture_output=True, text=True)
    wheels = list(dist.glob("curate-*.whl"))
    assert len(wheels) == 1
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheels[0])], check=True, capture_output=True, text=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # third-party packages only
    shutil.rmtree(src)  # nothing of the source copy may be needed any more
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CURATE_CATALOG", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, work, env


def _run(wheel_venv, *args, check=True):
    venv, work, env = wheel_venv
    res = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_imports_the_installed_wheel_and_its_bundled_dirs(wheel_venv):
    venv = wheel_venv[0]
    out = _run(wheel_venv, str(venv / "bin" / "python"), "-c",
               "import curate, curate.resources as r, json; print(json.dumps([curate.__file__, "
               "str(r.sql_dir()), str(r.filters_dir()), str(r.train_dir()), str(r.eval_dir()), "
               "r.SOURCE_ROOT is None, r.example_catalog() is None]))").stdout
    f, sql, filters, train, ev, no_source, no_example = json.loads(out)
    assert f.startswith(str(venv)) and not f.startswith(str(REPO))
    for d in (sql, filters, train, ev):
        assert d.startswith(str(venv)) and "/curate/_bundled/" in d
    assert no_source and no_example


def test_bundled_filter_by_name_from_any_directory(wheel_venv, tmp_path):
    cat = REPO / "catalog.duckdb.example"
    _run(wheel_venv, "curate", "run", "clip_score_l14_30pct", "--catalog", str(cat), "-o", "out.npy")
    work = wheel_venv[1]
    expected = tmp_path / "repo.npy"
    subprocess.run([sys.executable, "-m", "curate", "run", str(REPO / "filters" / "clip_score_l14_30pct.sql"),
                    "--catalog", str(cat), "-o", str(expected)], check=True, capture_output=True, cwd=REPO)
    assert (work / "out.npy").read_bytes() == expected.read_bytes()
    man = json.loads((work / "out.json").read_text())
    assert man["filter"].endswith("_bundled/filters/clip_score_l14_30pct.sql")


def test_own_filter_file_and_missing_catalog(wheel_venv):
    work = wheel_venv[1]
    (work / "mine.sql").write_text("SELECT uid FROM pool WHERE original_width >= 200\n")
    res = _run(wheel_venv, "curate", "run", "mine.sql", "-c", str(REPO / "catalog.duckdb.example"), "-o", "mine.npy")
    assert "mine.sql: kept" in res.stdout
    res = _run(wheel_venv, "curate", "run", "mine.sql", "-o", "x.npy", check=False)
    assert res.returncode == 1 and "no catalog: pass --catalog" in res.stderr and "Traceback" not in res.stderr


def test_train_scales_and_eval_task_list_come_from_the_wheel(wheel_venv):
    venv = wheel_venv[0]
    out = _run(wheel_venv, str(venv / "bin" / "python"), "-c",
               "import json, yaml, curate.resources as r; "
               "s = yaml.safe_load((r.train_dir() / 'scales.yaml').read_text()); "
               "t = yaml.safe_load((r.eval_dir() / 'tasklist.yml').read_text()); "
               "print(json.dumps([sorted(s), len(t), (r.train_dir() / 'models' / 'tiny-vit' / 'open_clip_config.json').is_file()]))"
               ).stdout
    scales, tasks, tiny_config = json.loads(out)
    assert "tiny" in scales and "small" in scales and tasks == 40 and tiny_config
    res = _run(wheel_venv, "curate", "train", "--scale", "nope", "--data", "x", "--output-dir", "o", check=False)
    assert res.returncode != 0 and "tiny" in res.stdout + res.stderr  # the scale list read from the wheel
    assert _run(wheel_venv, "curate", "eval", "--help").returncode == 0
