"""parallel_state's collectives over 2 gloo processes, and its trivial single-process answers."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from sglang.multimodal_gen.runtime.distributed import parallel_state as ps
from sglang.multimodal_gen.runtime.distributed.worker_group import free_port


def test_single_process_accessors_are_trivial():
    assert (ps.world_rank(), ps.world_size(), ps.sp_rank(), ps.sp_world_size(), ps.cfg_rank()) == (0, 1, 0, 1, 0)
    x = torch.arange(6.0).reshape(2, 3)
    group = ps.get_sp_group()
    assert group.all_gather(x) is x and group.all_to_all(x, 0, 1) is x and group.all_reduce(x) is x
    assert group.broadcast_flag(True) is True


def test_group_layout():
    assert ps.group_layout(4, sp_degree=2, cfg_degree=2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert ps.group_layout(2, sp_degree=1, cfg_degree=2) == ([[0], [1]], [[0, 1]])


def _rank(rank: int, port: int, results) -> None:
    ps.init_parallel_state(rank, 2, f"tcp://127.0.0.1:{port}", sp_degree=2, cfg_degree=1, backend="gloo", timeout_s=30)
    sp = ps.get_sp_group()
    # [seq=4 local tokens, heads=2]: all_to_all(scatter heads, gather seq) gives this rank's head over all 8 tokens.
    local = torch.arange(8.0).reshape(4, 2) + 100 * rank
    exchanged = sp.all_to_all(local, scatter_dim=1, gather_dim=0)
    back = sp.all_to_all(exchanged, scatter_dim=0, gather_dim=1)
    results.put((
        rank, ps.sp_rank(), ps.sp_world_size(), ps.cfg_world_size(), exchanged.tolist(), torch.equal(back, local),
        sp.all_gather(torch.tensor([rank])).tolist(), sp.all_reduce(torch.tensor([rank + 1.0])).item(),
        sp.broadcast_flag(rank == 1, src=1), sp.broadcast_object({"from": rank}, src=0),
    ))
    ps.destroy_parallel_state()


def test_collectives_over_two_gloo_processes():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, sp_rank, sp_size, cfg_size, exchanged, round_trip, gathered, reduced, flag, obj in got:
        assert (sp_rank, sp_size, cfg_size) == (rank, 2, 1)
        # head `rank` of rank 0's tokens, then of rank 1's
        assert exchanged == [[float(2 * t + rank + 100 * src)] for src in range(2) for t in range(4)]
        assert round_trip and gathered == [0, 1] and reduced == 3.0 and flag is True and obj == {"from": 0}
