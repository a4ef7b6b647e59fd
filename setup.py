"""Build step that ships the repository's top-level data directories inside the wheel.

``sql/``, ``filters/``, ``train/`` and ``eval/`` stay at the repository's top level (the design
card); a regular (non-editable) build copies them into ``curate/_bundled/`` of the wheel, where
:func:`curate.resources.bundled` finds them. Editable installs read them from the checkout, so
nothing is copied by hand and nothing can go out of sync. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("sql", "filters", "train", "eval")
ROOT = Path(__file__).resolve().parent


class BuildPyWithBundled(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's directories
        for name in BUNDLED:
            dst = Path(self.build_lib) / "curate" / "_bundled" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(ROOT / name, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithBundled})
