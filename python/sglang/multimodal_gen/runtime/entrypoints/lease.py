"""What a replica of a shared job store does beside its worker: keep its running job's lease,
notice a DELETE made on another replica, and fail the jobs of replicas that died.

A thread of its own, since a generation step (or the VAE decode after the last one) may take
longer than a lease: the worker thread cannot be relied on to renew it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStore, JobStoreError

logger = logging.getLogger(__name__)

# A DELETE on another replica stops the generation within this long (plus one step).
MAX_CHECK_INTERVAL_S = 5.0


def check_interval_s(lease_s: float) -> float:
    """How often the lease is renewed and the store swept: a third of the lease, at most 5 s."""
    return max(0.1, min(MAX_CHECK_INTERVAL_S, lease_s / 3))


class LeaseKeeper:
    """Every :func:`check_interval_s`: renew the lease of the job ``running()`` names and report
    to ``on_lost(job_id, state)`` when it was deleted elsewhere (``"cancelled"``) or is no longer
    this replica's (``"lost"``); then fail the jobs whose lease ran out (``replica_lost``).

    Args:
        store: The shared job store.
        owner: This replica's id.
        lease_s: The lease each renewal grants.
        running: The id of the job this replica runs now, or ``None``.
        on_lost: Called (from this thread) when the running job must stop.
    """

    def __init__(self, store: JobStore, owner: str, lease_s: float, running: Callable[[], str | None],
                 on_lost: Callable[[str, str], None]) -> None:
        self.store, self.owner, self.lease_s = store, owner, lease_s
        self.running, self.on_lost = running, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sglang-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(check_interval_s(self.lease_s)):
            try:
                self.check()
            except JobStoreError as exc:  # the database away for a moment: the next check tries again
                logger.warning("could not renew the lease or sweep the job store: %s", exc)
            except Exception:  # must not end the thread silently: leases would run out
                logger.exception("the lease keeper failed")

    def check(self) -> None:
        """One round: renew, then sweep."""
        job_id = self.running()
        if job_id is not None:
            state = self.store.renew(job_id, self.owner, self.lease_s)
            if state != "running":
                self.on_lost(job_id, state)
        lost = self.store.sweep_lost()
        if lost:
            logger.warning("%d video(s) whose server stopped renewing its lease are now failed (replica_lost): %s",
                           len(lost), ", ".join(lost))
