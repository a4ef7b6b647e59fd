"""curate: DuckDB/SQL-first curation of image-text pre-training data (DataComp, TiC-CLIP)."""

__version__ = "0.1.0"
