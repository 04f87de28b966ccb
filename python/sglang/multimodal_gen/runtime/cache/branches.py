"""The names of the CFG branches a request runs: the keys of every per-branch mapping (prompt
embeddings, cache state, stats, predictions)."""

COND = "cond"
UNCOND = "uncond"
