"""What the caching benchmark sweeps: its settings, the configurations it runs and their roles.

A configuration is a ``BenchConfig``: ``impl`` picks the runner (our pipeline or diffusers'),
``strategy`` names its line on the speed/fidelity frontier and ``kind`` its role there (the
uncached baseline, a never-skipping control, a threshold sweep point or a preset). To measure
something new, add its configurations to ``build_configs``, and give a new ``strategy`` its line in
``FRONTIER_STYLES``; the harness runs whatever it is given and the report groups rows by
``strategy`` and ``kind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND

REPO = Path(__file__).resolve().parents[1]

# Captions of the built-in model's synthetic world; the first is one it never saw in training.
PROMPTS = [
    "a red circle moving left on a white background",
    "a blue square moving right on a yellow background",
    "a yellow triangle moving down on a black background",
    "a white circle moving up on a green background",
    "a green triangle moving left on a red background",
    "a black square moving down on a blue background",
]
BASELINE = "uncached"
PEER_BASELINE = "diffusers uncached"
# Strategies: one line each on the frontier plot; the report pairs the last two threshold by threshold.
OURS_MAGCACHE = "ours magcache"
OURS_MAGCACHE_PER_BRANCH = "ours magcache, per-branch plans (release)"
OURS_TEACACHE = "ours teacache"
OURS_MAGCACHE_SHARED = "ours magcache, diffusers' settings"
DIFFUSERS_MAGCACHE = "diffusers magcache hook"
OURS_PLANNER = "ours planner"
# The speedups the planner is asked for (--cache-speedup), as presets: their passes are exact.
PLANNER_SPEEDUPS = (1.5, 2.0, 3.0)
# matplotlib format of each strategy's line, in legend order; a strategy not named here is not plotted.
FRONTIER_STYLES = {OURS_MAGCACHE: "o-", OURS_MAGCACHE_PER_BRANCH: "x-.", OURS_TEACACHE: "s-",
                   OURS_MAGCACHE_SHARED: "^--", DIFFUSERS_MAGCACHE: "v:"}
# A random Wan transformer whose blocks dominate the step, for the speed part only.
BLOCK_HEAVY_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=12)


@dataclass
class Sweep:
    """What to run. ``default`` is sized for a 2-core CPU; ``full`` is the full sweep."""

    prompts: list[str]
    seeds: list[int]
    repeats: int
    magcache_thresholds: list[float]
    teacache_thresholds: list[float]
    peer_thresholds: list[float]
    max_skip_steps: int = 4
    retention_ratio: float = 0.2

    @classmethod
    def default(cls) -> "Sweep":
        return cls(PROMPTS[:2], [0], 5, [0.03, 0.06, 0.12, 0.24], [0.025, 0.05, 0.1, 0.2], [0.06, 0.12, 0.24])

    @classmethod
    def full(cls) -> "Sweep":
        return cls(PROMPTS, [0, 1], 5, [0.015, 0.03, 0.06, 0.12, 0.24, 0.48], [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4],
                   [0.03, 0.06, 0.12, 0.24, 0.48])


@dataclass
class BenchConfig:
    """One configuration. ``strategy`` names its line on the frontier; ``kind`` is its role there."""

    name: str
    strategy: str
    kind: str = "sweep"  # "uncached" | "never-skip" | "sweep" | "preset"
    cache: CacheParams = field(default_factory=CacheParams)
    hook: dict[str, Any] | None = None  # diffusers MagCacheConfig settings for the peer
    impl: str = "ours"  # "ours" | "diffusers"
    threshold: float | None = None

    @property
    def baseline(self) -> str:
        return BASELINE if self.impl == "ours" else PEER_BASELINE



def build_configs(
    sweep: Sweep, calibration_file: str | None, shared_ratios: list[float], peer: bool, teacache: bool = True
) -> list[BenchConfig]:
    """Uncached first (every fidelity number refers to it), then our strategies, then the peer."""
    cal = {"calibration_file": calibration_file} if calibration_file else {}
    knobs = {"max_skip_steps": sweep.max_skip_steps, "retention_ratio": sweep.retention_ratio}
    mag, tea = OURS_MAGCACHE, OURS_TEACACHE
    configs = [
        BenchConfig(BASELINE, "uncached", "uncached"),
        BenchConfig("magcache never-skip", mag, "never-skip", CacheParams("magcache", threshold=0.0, **cal)),
    ]
    configs += [BenchConfig(f"magcache t={t}", mag, cache=CacheParams("magcache", threshold=t, **knobs, **cal),
                            threshold=t) for t in sweep.magcache_thresholds]
    configs += [BenchConfig(f"magcache preset {p}", mag, "preset", CacheParams("magcache", preset=p, **cal))
                for p in ("default", "fast")]
    # The release code plans each CFG branch alone; our default plans them together (sync_branches).
    apart = {"sync_branches": False}
    configs += [BenchConfig(f"magcache t={t} per-branch plans", OURS_MAGCACHE_PER_BRANCH,
                            cache=CacheParams("magcache", threshold=t, options=apart, **knobs, **cal), threshold=t)
                for t in sweep.magcache_thresholds]
    if teacache:
        never = CacheParams("teacache", threshold=0.0, **cal)
        configs.append(BenchConfig("teacache never-skip", tea, "never-skip", never))
        configs += [BenchConfig(f"teacache t={t}", tea, cache=CacheParams("teacache", threshold=t, **cal), threshold=t)
                    for t in sweep.teacache_thresholds]
        configs += [BenchConfig(f"teacache preset {p}", tea, "preset", CacheParams("teacache", preset=p, **cal))
                    for p in ("default", "fast")]
    configs += [BenchConfig(f"planner {x:g}x", OURS_PLANNER, "preset", CacheParams(speedup=x, **cal))
                for x in PLANNER_SPEEDUPS]
    if peer:
        shared = {"mag_ratios": {COND: shared_ratios, UNCOND: shared_ratios}}
        hook = {"mag_ratios": shared_ratios, **knobs}
        configs += [BenchConfig(f"magcache shared t={t}", OURS_MAGCACHE_SHARED,
                                cache=CacheParams("magcache", threshold=t, options=shared, **knobs), threshold=t)
                    for t in sweep.peer_thresholds]
        configs += [
            BenchConfig(PEER_BASELINE, "uncached", "uncached", impl="diffusers"),
            # diffusers skips while err <= threshold, so 0 may still skip; retention 1 never does.
            BenchConfig("diffusers hook never-skip", DIFFUSERS_MAGCACHE, "never-skip", impl="diffusers",
                        hook={**hook, "threshold": 0.0, "retention_ratio": 1.0}),
        ]
        configs += [BenchConfig(f"diffusers hook t={t}", DIFFUSERS_MAGCACHE, impl="diffusers",
                                hook={**hook, "threshold": t}, threshold=t) for t in sweep.peer_thresholds]
    return configs


def describe(config: BenchConfig) -> str:
    """The settings column of the tables: the knobs a configuration sets, in the user's words."""
    if config.hook:
        hook = config.hook
        return f"threshold {hook['threshold']}, K {hook['max_skip_steps']}, retention {hook['retention_ratio']}"
    cache = config.cache
    if not cache.enabled:
        return ""
    parts = [f"preset {cache.preset}"] if cache.preset else []
    parts += [f"speedup {cache.speedup:g}x"] if cache.speedup else []
    parts += [f"{k} {v}" for k, v in (("threshold", cache.threshold), ("K", cache.max_skip_steps),
                                      ("retention", cache.retention_ratio)) if v is not None]
    if "mag_ratios" in cache.options:
        parts.append("cond ratios for both branches")
    return ", ".join(parts)


@dataclass
class BenchSettings:
    """One benchmark run: the sweep, the request and machine settings, and where the results go."""

    sweep: Sweep
    model_path: str | None = None
    request: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides: steps, size
    device: str | None = None
    threads: int = 1
    peer: bool = True
    block_heavy: bool = True
    configs: list[BenchConfig] | None = None  # overrides the sweep's configurations
    calibration_file: str | None = None  # default: the model's own, else calibrate on the prompts
    output_dir: Path = REPO / "benchmark" / "results"
    plot_path: Path = REPO / "docs" / "images" / "benchmark_frontier.png"
    tag: str = ""
    command: str = ""
