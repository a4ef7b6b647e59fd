"""Per-sample work computed once into uid-keyed tables (producers): text features, CLD3,
embeddings as memory maps, cluster sets and nearest-centroid assignments, neighbours."""
