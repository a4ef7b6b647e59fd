"""``curate run --plot PNG``: the histogram of each score a filter thresholds, its kept part
overlaid and the threshold drawn (matplotlib, the ``plot`` extra, Agg backend: no display).

The counts come from DuckDB (:func:`curate.run.explain.score_histograms`, one grouped query per
score over the filter's ``FROM``); this module only draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from curate.atomic import atomic_path
from curate.errors import CurateError

#: inches and dots per inch of one panel: a PNG is WIDTH*DPI x (HEIGHT*DPI * panels) pixels
PANEL_WIDTH, PANEL_HEIGHT, DPI = 8.0, 3.5, 100


@dataclass
class Histogram:
    """Counts of one thresholded score over the filter's FROM, in equal-width bins."""

    score: str  # the score as written in the filter, e.g. p.clip_b32_similarity_score
    edges: list[float]  # bins + 1 edges
    rows: list[int]  # rows per bin
    kept: list[int]  # of which the filter kept (every conjunct TRUE)
    thresholds: list[tuple[str, float | None]] = field(default_factory=list)  # (conjunct as written, value)
    missing: int = 0  # rows whose score is NULL, NaN or infinite (not in any bin)

    @property
    def total(self) -> int:
        return sum(self.rows) + self.missing


def png_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a plot of ``panels`` scores."""
    return int(PANEL_WIDTH * DPI), int(PANEL_HEIGHT * DPI) * panels


def draw_histograms(hists: list[Histogram], out, title: str) -> Path:
    """One panel per score: every row of the FROM (grey), the kept rows over it (blue), a dashed
    line at each threshold; written atomically to ``out`` (PNG, :func:`png_size` pixels)."""
    try:
        import matplotlib  # lazy: optional extra [plot]
    except ImportError:
        raise CurateError("--plot needs matplotlib: pip install 'curate[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional extra [plot]

    fig, axes = plt.subplots(len(hists), 1, figsize=(PANEL_WIDTH, PANEL_HEIGHT * len(hists)), dpi=DPI,
                             squeeze=False)
    try:
        for ax, h in zip(axes[:, 0], hists):
            ax.stairs(h.rows, h.edges, fill=True, color="#bbbbbb", label=f"all rows ({sum(h.rows):,})")
            ax.stairs(h.kept, h.edges, fill=True, color="#4477aa", alpha=0.85, label=f"kept ({sum(h.kept):,})")
            for text, value in h.thresholds:
                if value is not None:
                    ax.axvline(value, color="#cc3311", linestyle="--", linewidth=1.2,
                               label=f"threshold {value:.6g}")
            ax.set_xlabel(h.score + (f"  ({h.missing:,} rows NULL/NaN, not drawn)" if h.missing else ""))
            ax.set_ylabel("rows")
            ax.legend(fontsize=8, loc="upper right")
        axes[0, 0].set_title(title, fontsize=9)
        fig.tight_layout()
        out = Path(out)
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return out


__all__ = ["DPI", "Histogram", "PANEL_HEIGHT", "PANEL_WIDTH", "draw_histograms", "png_size"]
