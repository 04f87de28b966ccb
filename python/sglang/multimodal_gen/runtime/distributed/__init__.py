"""The distributed layer: process groups and the collectives the runtime uses (parallel_state)."""
