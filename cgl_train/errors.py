"""Failures of a training run that `cgl-train` reports with their message and exit code 1.

Kept apart from the engine so the CLI can catch them without importing torch first.
"""
from __future__ import annotations

__all__ = ["NonFiniteTraining"]


class NonFiniteTraining(RuntimeError):
    """A training step's loss terms or gradients were not finite; the message names epoch, step and terms."""
