"""What the fast-path benchmark runs: the variants of our loop, diffusers beside them, the comparisons.

A :class:`Variant` is one way to run a request: our pipeline with each fast-path change on or off
(request constants hoisted, CFG branches batched, blocks compiled), or diffusers' ``WanPipeline``;
uncached, or with MagCache configured as diffusers' hook takes it (one ratio curve for both
branches), so ours and the hook skip the same steps. A :class:`Comparison` names two variants
whose time ratio shows one change's gain; the report takes the median of that ratio over the
timed rounds, each pair measured in the same round.
"""

from __future__ import annotations

from dataclasses import dataclass

# MagCache as the end-to-end comparison runs it, in ours and in diffusers' hook alike.
MAGCACHE_THRESHOLD = 0.12
MAGCACHE_MAX_SKIP_STEPS = 4
MAGCACHE_RETENTION = 0.2

PROMPT = "a red circle moving left on a white background"  # held out of the built-in model's training
SEED = 0
# The block-dominated model's request (a random folder has Wan2.1's 480x832x81 defaults): the
# built-in model's size with 9 frames, so its 12 wide layers fit a CPU run.
BLOCK_HEAVY_REQUEST = dict(height=64, width=64, num_frames=9, num_inference_steps=50)


@dataclass(frozen=True)
class Variant:
    """One way to run the request.

    Attributes:
        name: Its row in the tables.
        impl: ``ours`` or ``diffusers``.
        hoisted: Request constants computed once (ours; off = the loop before the fast path).
        batched_cfg: cond and uncond as one batch of 2 (ours).
        compiled: The DiT blocks compiled with ``torch.compile`` (ours, ``--enable-torch-compile``).
        cached: MagCache at the comparison's settings (ours) or diffusers' MagCache hook (diffusers).
    """

    name: str
    impl: str = "ours"
    hoisted: bool = True
    batched_cfg: bool = False
    compiled: bool = False
    cached: bool = False


@dataclass(frozen=True)
class Comparison:
    """``slower`` over ``faster``: the gain of the change between them (above 1: it helps)."""

    label: str
    slower: str
    faster: str


def variants(compile_blocks: bool) -> list[Variant]:
    """Every variant, uncached and cached; the compiled ones only when ``compile_blocks``."""
    loops = [
        ("before", dict(hoisted=False)),
        ("hoisted", {}),
        ("hoisted+batched", dict(batched_cfg=True)),
    ]
    if compile_blocks:
        loops += [("hoisted+compiled", dict(compiled=True)),
                  ("hoisted+batched+compiled", dict(batched_cfg=True, compiled=True))]
    out = [Variant("diffusers", impl="diffusers"), Variant("diffusers+hook", impl="diffusers", cached=True)]
    for label, settings in loops:
        out += [Variant(f"ours {label}", **settings), Variant(f"ours {label} magcache", cached=True, **settings)]
    return out


def comparisons(compile_blocks: bool) -> list[Comparison]:
    """The gains the issue asks to see, each between two variants that differ in one change only,
    and ours (before the fast path, and with each loop after it) against diffusers."""
    loops = ["before", "hoisted", "hoisted+batched"] + (["hoisted+batched+compiled"] if compile_blocks else [])
    out = [Comparison(f"ours {loop} vs diffusers, uncached", "diffusers", f"ours {loop}") for loop in loops]
    out += [
        Comparison("hoisting, uncached", "ours before", "ours hoisted"),
        Comparison("hoisting, magcache", "ours before magcache", "ours hoisted magcache"),
        Comparison("batched CFG, uncached", "ours hoisted", "ours hoisted+batched"),
        Comparison("batched CFG, magcache", "ours hoisted magcache", "ours hoisted+batched magcache"),
    ]
    if compile_blocks:
        out += [
            Comparison("compiled, two passes, uncached", "ours hoisted", "ours hoisted+compiled"),
            Comparison("compiled, two passes, magcache", "ours hoisted magcache", "ours hoisted+compiled magcache"),
            Comparison("compiled, batched, uncached", "ours hoisted+batched", "ours hoisted+batched+compiled"),
            Comparison("compiled, batched, magcache", "ours hoisted+batched magcache",
                       "ours hoisted+batched+compiled magcache"),
        ]
    out += [Comparison(f"ours {loop} vs diffusers+hook, identical plans", "diffusers+hook", f"ours {loop} magcache")
            for loop in loops]
    return out
