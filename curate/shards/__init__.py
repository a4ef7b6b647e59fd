"""Webdataset shards: the shard index in the catalog, tar reading and writing, the resharder
and its verification."""
