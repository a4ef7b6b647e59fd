"""Pool analytics by time: samples per year and month, and a filter's keep rate per year.

Both are aggregate queries over ``pool ⋈ timesplit`` (one pass each); the results are written
as CSV tables and drawn as one PNG (matplotlib, Agg backend, so no display is needed). The keep
rate is computed over training samples (eval uids excluded), the population TiC's filtered
variants ("basic", "bestpool") are cut from.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from curate.atomic import atomic_path
from curate.catalog.connection import connect
from curate.tic import TicError
from curate.tic.export import keep_condition, ensure_filter_features


@dataclass
class TimeStats:
    by_month: list[tuple[int, int, int, int]] = field(default_factory=list)  # year, month, samples, eval
    by_year: list[tuple[int, int, int]] = field(default_factory=list)  # year, samples, eval
    keep: list[tuple[int, int, int, float]] = field(default_factory=list)  # year, train, kept, rate
    filter: str | None = None


def time_stats(catalog, filter_path=None, sets: dict | None = None) -> TimeStats:
    """Samples per year/month of the pool (and per-year keep rate of ``filter_path`` if given)."""
    catalog = Path(catalog)
    ensure_filter_features(catalog, filter_path, sets or {})
    con = connect(catalog)
    try:
        con.execute("SELECT 1 FROM timesplit LIMIT 0")
    except Exception:  # noqa: BLE001 - duckdb CatalogException
        raise TicError(f"{catalog}: no timesplit view; run `curate tic attach` first") from None
    st = TimeStats()
    base = """
        SELECT t.year, coalesce(t.month, 0) AS month, count(*) AS n,
               count(*) FILTER (WHERE p.uid IN (SELECT uid FROM tic_eval)) AS n_eval {extra}
        FROM pool AS p JOIN timesplit AS t ON t.uid = p.uid
        GROUP BY ALL ORDER BY 1, 2"""
    extra = ""
    if filter_path is not None:
        keep_condition(con, Path(filter_path), sets or {})  # registers __tic_keep
        extra = (", count(*) FILTER (WHERE p.uid NOT IN (SELECT uid FROM tic_eval) "
                 "AND p.uid IN (SELECT uid FROM __tic_keep)) AS n_kept")
        st.filter = str(filter_path)
    rows = con.execute(base.format(extra=extra)).fetchall()
    con.close()
    years: dict[int, list[int]] = {}
    for r in rows:
        year, month, n, n_eval = r[:4]
        kept = r[4] if len(r) > 4 else 0
        st.by_month.append((year, month, n, n_eval))
        acc = years.setdefault(year, [0, 0, 0])
        acc[0] += n
        acc[1] += n_eval
        acc[2] += kept
    for year, (n, n_eval, kept) in sorted(years.items()):
        st.by_year.append((year, n, n_eval))
        if filter_path is not None:
            train = n - n_eval
            st.keep.append((year, train, kept, kept / train if train else 0.0))
    return st


def _csv(path: Path, header: list[str], rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_stats(st: TimeStats, out) -> list[Path]:
    """CSV tables and ``tic_stats.png`` under ``out``; returns the files written."""
    out = Path(out)
    files = [out / "samples_by_year.csv", out / "samples_by_month.csv"]
    _csv(files[0], ["year", "samples", "eval_samples"], st.by_year)
    _csv(files[1], ["year", "month", "samples", "eval_samples"], st.by_month)
    if st.keep:
        files.append(out / "keep_rate_by_year.csv")
        _csv(files[-1], ["year", "train_samples", "kept", "keep_rate"],
             [(y, n, k, f"{r:.6f}") for y, n, k, r in st.keep])
    import matplotlib  # lazy: optional extra [plot]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional extra [plot]

    n_plots = 2 if st.keep else 1
    fig, axes = plt.subplots(n_plots, 1, figsize=(10, 3.2 * n_plots), squeeze=False)
    ax = axes[0][0]
    labels = [f"{y}-{m:02d}" if m else str(y) for y, m, _, _ in st.by_month]
    ax.bar(range(len(labels)), [n for _, _, n, _ in st.by_month], color="#4477aa", label="samples")
    ax.bar(range(len(labels)), [e for _, _, _, e in st.by_month], color="#ee6677", label="eval uids")
    step = max(1, len(labels) // 12)
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("samples")
    ax.set_title("pool samples per Common Crawl snapshot month")
    ax.legend(fontsize=8)
    if st.keep:
        ax2 = axes[1][0]
        ax2.plot([y for y, *_ in st.keep], [100 * r for *_, r in st.keep], marker="o", color="#228833")
        ax2.set_ylabel("kept (%)")
        ax2.set_xlabel("year")
        ax2.set_title(f"keep rate per year: {Path(st.filter).name}")
        ax2.set_ylim(bottom=0)
    fig.tight_layout()
    png = out / "tic_stats.png"
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    files.append(png)
    return files
