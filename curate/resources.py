"""Where curate's bundled files are: the one home of "the repository root".

``sql/``, ``filters/``, ``train/`` and ``eval/`` live at the repository's top level (the design
card) and are shipped inside the wheel as ``curate/_bundled/<name>/`` (setuptools' package-dir
mapping in ``pyproject.toml``; no copies kept by hand). :func:`bundled` finds them in either
place: an installed wheel first, else the source checkout this package was imported from (an
editable install or ``PYTHONPATH``). The example catalog and its sample pool are not shipped in
the wheel: they live in the source tree only.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: the checkout above the package, when curate runs from source (None in a wheel install)
SOURCE_ROOT: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None

BUNDLED = ("sql", "filters", "train", "eval")


def bundled(name: str) -> Path:
    """The directory of bundled ``name`` (one of :data:`BUNDLED`)."""
    if name not in BUNDLED:
        raise ValueError(f"{name}: not a bundled directory ({', '.join(BUNDLED)})")
    inside = PACKAGE_DIR / "_bundled" / name
    if inside.is_dir():
        return inside
    if SOURCE_ROOT is not None and (SOURCE_ROOT / name).is_dir():
        return SOURCE_ROOT / name
    return inside  # a broken install: callers report the missing file by this path


def sql_dir() -> Path:
    return bundled("sql")


def filters_dir() -> Path:
    return bundled("filters")


def train_dir() -> Path:
    return bundled("train")


def eval_dir() -> Path:
    return bundled("eval")


def example_catalog() -> Path | None:
    """The bundled example catalog of a source checkout (None in a wheel install)."""
    if SOURCE_ROOT is None:
        return None
    return SOURCE_ROOT / "catalog.duckdb.example"


def bundled_filter(name: str) -> Path | None:
    """The bundled filter called ``name``: ``laion2b``, ``laion2b.sql``, ``tic/year`` or
    ``filters/tic/year.sql`` (as the docs write it). None when there is no such filter."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    if rel.parts and rel.parts[0] == "filters":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    if rel.suffix != ".sql":
        rel = rel.with_name(rel.name + ".sql")
    p = filters_dir() / rel
    return p if p.is_file() else None


def filter_file(spec: str | Path) -> Path:
    """A filter given on the command line: an existing file as given, else a bundled filter by
    name; else the path as given (so the caller's "not found" error names what the user typed)."""
    p = Path(spec)
    if p.is_file():
        return p
    return bundled_filter(str(spec)) or p


def list_filters() -> list[Path]:
    """Every bundled filter, sorted (``filters/*.sql`` and ``filters/tic/*.sql``)."""
    return sorted(filters_dir().rglob("*.sql"))
