"""CFG parallel: which CFG branches this rank runs, and how the branches' predictions meet.

The denoising stage asks a :class:`BranchPlacement` for its local branches, runs them, and
calls :meth:`BranchPlacement.gather` for every branch's prediction before guidance, so every
rank steps the scheduler on the same values. With one process (or a request with one branch)
everything is local and nothing is exchanged. The cache of each rank holds only its branches'
state; :meth:`attach` wires the two things a strategy may need from other ranks: the statistic
reducer (over the sequence-parallel group: a statistic over tokens is summed over every shard)
and, for a strategy that decides per CFG pair (EasyCache), the decision broadcast from the rank
that runs the first branch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sglang.multimodal_gen.runtime.distributed import parallel_state as ps


class BranchPlacement:
    """The CFG branches of one request over the cfg group (cfg rank ``i`` runs branch ``i``)."""

    def __init__(self, branches: Sequence[str]) -> None:
        self.branches = tuple(branches)
        self.group = ps.get_cfg_group()
        n = self.group.world_size
        self.split = n > 1 and len(self.branches) > 1
        if self.split and n != len(self.branches):
            raise RuntimeError(f"CFG parallel over {n} ranks needs {n} CFG branches, this request has {len(self.branches)}")
        self.local_branches = (self.branches[self.group.rank_in_group],) if self.split else self.branches

    def attach(self, cache) -> None:
        """Install the cross-rank statistic reducer and pair-decision exchange on ``cache``."""
        if cache is None:
            return
        sp = ps.get_sp_group()
        if sp.world_size > 1:
            cache.set_statistic_reducer(sp.all_reduce)
        if self.split and cache.decides_per_pair:
            group = self.group

            def exchange(step: int, decision: bool | None) -> bool:
                return group.broadcast_flag(decision, src=0)

            cache.set_decision_exchange(exchange)

    def gather(self, preds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every branch's prediction on every rank (one all_gather over the cfg group)."""
        if not self.split:
            return preds
        (branch,) = self.local_branches
        return dict(zip(self.branches, self.group.all_gather_list(preds[branch])))

    def merge_stats(self, cache) -> None:
        """Fill the branches run elsewhere into this rank's cache stats, so every rank (and the
        result rank 0 returns) reports every branch's computed and skipped steps; when calibrating,
        their calibration records too (``sglang calibrate`` reads every branch's from rank 0)."""
        if cache is None or not self.split:
            return
        (branch,) = self.local_branches
        everyone = self.group.all_gather_object(cache.stats.branches[branch])
        for name, branch_stats in zip(self.branches, everyone):
            if name != branch:
                cache.stats.branches[name] = branch_stats
        if cache.calibrate:
            records = cache.calibration_records()
            for name, theirs in zip(self.branches, self.group.all_gather_object(dict(records))):
                if name != branch:
                    _take_branch_records(records, theirs, name)


def _take_branch_records(mine, theirs, branch: str) -> None:
    """Copy ``branch``'s calibration records from another rank's into this rank's, in place: a
    cache's are ``{branch: record}``, a two-expert cache's ``{expert: {branch: record}}``."""
    if branch in theirs:
        mine[branch] = theirs[branch]
        return
    for expert, records in theirs.items():
        mine[expert][branch] = records[branch]
