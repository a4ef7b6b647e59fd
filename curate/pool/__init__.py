"""Getting a pool: download (img2dataset), bring your own data (scoring), pools built from
tables and recipes (TiC-YFCC15M, TiC-RedCaps), generated sample pools."""
