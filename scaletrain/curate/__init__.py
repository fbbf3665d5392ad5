"""Offline data curation: rewrite a shard set through stages and report what was kept.

``shards.rewrite_shards`` is the one loop (stream, batch, run stages, write atomically, merge
the per-rank reports); the stages are metadata filters (``data.filters.FilterSpec``),
auto-captioning (``caption``), NSFW scoring (``safety``) and the aesthetic scorer
(``aesthetic``). ``commands`` is the ``scaletrain curate ...`` CLI.
"""
