"""What a request's cache reports: per branch the computed and skipped steps, with what the
denoising stage measured, as the summary lines the CLI prints and the dict the server returns."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

#: A timed pass slower than this many times the median pass is left out of the typical pass time.
OUTLIER_FACTOR = 4.0


@dataclass
class BranchStats:
    """Which steps of one CFG branch ran the DiT blocks and which reused the cache."""

    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)

    @property
    def num_computed(self) -> int:
        return len(self.computed_steps)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_steps)


def format_steps(steps: Sequence[int]) -> str:
    """Steps as compact ranges, e.g. ``[10, 12, 14, 15, 16]`` -> ``'10,12,14-16'``; ``'none'`` if empty."""
    runs: list[list[int]] = []
    for step in sorted(steps):
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) or "none"


@dataclass
class CacheStats:
    """Per-request summary of what a strategy cached, in the manner of cache-dit's ``summary()``.

    Besides the strategy's decisions it carries what the denoising stage measured
    (:meth:`record_timing`): the stage's time and the mean time of a DiT blocks pass. They live
    here, not on ``GenerationResult``, because this object is already the one per-request report
    both readers take: the CLI prints :meth:`summary` and the server returns :meth:`to_dict` as
    ``cache_stats``; and the estimate they feed needs the skipped-pass counts kept here. The
    strategy never writes them. ``None`` until recorded (no timing was taken).

    Attributes:
        denoising_seconds: Measured time of the denoising loop, on the passes' clock (CUDA events
            on CUDA) so the two add up; ``timings["denoising"]`` also counts the stage's setup.
        blocks_pass_seconds: Mean measured time of one DiT blocks pass (one branch, one step).
        timed_passes: How many blocks passes were timed (the computed passes of every branch).
        estimator: The residual estimator that made what skipped steps added (``reuse``, ...).
        estimator_history_bytes: The most memory its history of computed residuals held at once,
            all branches together (for ``reuse`` the one cached residual per branch).
        asked_speedup: The ``--cache-speedup`` asked for, shown beside the measured speedup;
            ``None`` without one.
        step_experts: On a model with several experts (Wan2.2), the expert of every step: the
            summary and ``to_dict`` then also report per expert. Empty for one transformer.
    """

    strategy: str
    num_inference_steps: int
    branches: dict[str, BranchStats] = field(default_factory=dict)
    denoising_seconds: float | None = None
    blocks_pass_seconds: float | None = None
    timed_passes: int = 0
    estimator: str = "reuse"
    estimator_history_bytes: int = 0
    asked_speedup: float | None = None
    step_experts: list[str] = field(default_factory=list)

    @property
    def total_computed(self) -> int:
        return sum(b.num_computed for b in self.branches.values())

    @property
    def total_skipped(self) -> int:
        return sum(b.num_skipped for b in self.branches.values())

    @property
    def pass_reduction(self) -> float:
        """Ideal speedup of the denoising stage: transformer passes uncached / passes made."""
        total = self.total_computed + self.total_skipped
        return total / self.total_computed if self.total_computed else float("inf")

    def summary(self) -> str:
        """One line for the user, e.g. 'magcache: computed 25 of 50 steps per branch (2.00x ...)', or
        with experts 'planner: high-noise computed 9 of 13, low-noise 16 of 37 steps per branch (...)'."""
        if not self.branches:
            return f"{self.strategy}: no transformer passes recorded"
        if self.step_experts:
            per_expert = [f"{expert.replace('_', '-')}{' computed' if index == 0 else ''} "
                          f"{_computed_of(stats.branches, stats.num_inference_steps)}"
                          for index, (expert, stats) in enumerate(self.experts().items())]
            done = f"{', '.join(per_expert)} steps{self._per_branch_suffix()}"
        else:
            done = f"computed {_computed_of(self.branches, self.num_inference_steps)} steps{self._per_branch_suffix()}"
        return f"{self.strategy}: {done} ({self.pass_reduction:.2f}x fewer transformer passes)"

    def _per_branch_suffix(self) -> str:
        counts = {s.num_computed for s in self.branches.values()}
        return " per branch" if len(counts) == 1 else ""

    def experts(self) -> dict[str, "CacheStats"]:
        """Per expert, the same report restricted to its steps (step indices stay the run's)."""
        result: dict[str, CacheStats] = {}
        for expert in dict.fromkeys(self.step_experts):
            own = {step for step, name in enumerate(self.step_experts) if name == expert}
            result[expert] = CacheStats(
                strategy=self.strategy, num_inference_steps=len(own), estimator=self.estimator,
                branches={b: BranchStats([t for t in s.computed_steps if t in own], [t for t in s.skipped_steps if t in own])
                          for b, s in self.branches.items()},
            )
        return result

    def record_timing(self, denoising_seconds: float, pass_seconds: Sequence[float]) -> None:
        """Keep the denoising stage's measured time and a typical blocks pass's time: the mean of
        the passes within ``OUTLIER_FACTOR`` of their median. A pass that compiled (the first
        request with ``--enable-torch-compile``, or a recompile) takes seconds where the others
        take milliseconds; counted in the mean, it would be charged again for every skipped step
        and inflate the uncached estimate, though an uncached run compiles no more than once."""
        self.denoising_seconds = denoising_seconds
        self.timed_passes = len(pass_seconds)
        if not pass_seconds:
            self.blocks_pass_seconds = None
            return
        typical = [s for s in pass_seconds if s <= OUTLIER_FACTOR * statistics.median(pass_seconds)]
        self.blocks_pass_seconds = sum(typical) / len(typical)

    @property
    def uncached_estimate_seconds(self) -> float | None:
        """Denoising time had no step been skipped: measured time + skipped passes x typical pass time.

        A skipped step still ran embed, head and the residual add, which stay in the measured time;
        an uncached step would not add the residual, so this overstates by that (small) cost.
        """
        if self.denoising_seconds is None:
            return None
        return self.denoising_seconds + self.total_skipped * (self.blocks_pass_seconds or 0.0)

    @property
    def measured_speedup(self) -> float | None:
        """Uncached estimate / measured denoising time: the speedup the cache gave in practice."""
        estimate = self.uncached_estimate_seconds
        if estimate is None or not self.denoising_seconds:
            return None
        return estimate / self.denoising_seconds

    def timing_line(self) -> str | None:
        """E.g. 'denoising 3.21 s, uncached estimate 6.05 s (1.88x measured, 2x asked)'; None before timing."""
        estimate, speedup = self.uncached_estimate_seconds, self.measured_speedup
        if estimate is None or speedup is None:
            return None
        asked = "" if self.asked_speedup is None else f", {self.asked_speedup:g}x asked"
        return (f"denoising {self.denoising_seconds:.2f} s, uncached estimate {estimate:.2f} s "
                f"({speedup:.2f}x measured{asked})")

    def skipped_line(self) -> str:
        """E.g. 'skipped steps: cond 10,12,14-16 | uncond 10,12,14-16' ('none' for a branch without)."""
        parts = " | ".join(f"{name} {format_steps(s.skipped_steps)}" for name, s in self.branches.items())
        return f"skipped steps: {parts or 'none'}"

    def estimator_line(self) -> str:
        """E.g. 'estimator forecast2_sigma, history 1.50 MiB': what skipped steps added, and its memory."""
        return f"estimator {self.estimator}, history {self.estimator_history_bytes / 2**20:.2f} MiB"

    def to_dict(self) -> dict[str, Any]:
        """The server's ``cache_stats``; with experts also ``experts: {name: {num_inference_steps,
        pass_reduction, branches}}``."""

        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        report = {
            "strategy": self.strategy,
            "num_inference_steps": self.num_inference_steps,
            "pass_reduction": round(self.pass_reduction, 4),
            "denoising_seconds": rounded(self.denoising_seconds, 6),
            "blocks_pass_seconds": rounded(self.blocks_pass_seconds, 6),
            "timed_passes": self.timed_passes,
            "uncached_estimate_seconds": rounded(self.uncached_estimate_seconds, 6),
            "measured_speedup": rounded(self.measured_speedup, 4),
            "estimator": self.estimator,
            "estimator_history_bytes": self.estimator_history_bytes,
            "asked_speedup": self.asked_speedup,
            "branches": {
                name: {
                    "computed": s.num_computed,
                    "skipped": s.num_skipped,
                    "computed_steps": list(s.computed_steps),
                    "skipped_steps": list(s.skipped_steps),
                }
                for name, s in self.branches.items()
            },
        }
        if self.step_experts:
            report["experts"] = {
                expert: {key: stats[key] for key in ("num_inference_steps", "pass_reduction", "branches")}
                for expert, stats in ((e, s.to_dict()) for e, s in self.experts().items())
            }
        return report


def _computed_of(branches: dict[str, BranchStats], num_steps: int) -> str:
    """``9 of 13`` when every branch computed as many steps, else ``cond 9, uncond 8 of 13``."""
    computed = {b: s.num_computed for b, s in branches.items()}
    if len(set(computed.values())) == 1:
        return f"{next(iter(computed.values()))} of {num_steps}"
    return f"{', '.join(f'{b} {n}' for b, n in computed.items())} of {num_steps}"
