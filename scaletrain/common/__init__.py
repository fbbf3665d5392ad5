"""The bottom layer: what several parts of scaletrain use and none owns (issue 30, layers).

``tars``: shard lists (paths, brace patterns, globs, URLs), the streaming tar reader every
shard consumer uses and the deterministic tar writer; ``ranks``: this process's rank and
world size, and a barrier that is a no-op on one process. Nothing here imports from the rest
of scaletrain (tests/unit/test_layers.py checks it), so any module may import it.
"""
