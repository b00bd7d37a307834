"""The embedded toy model zoo (work in progress: filled in by the toy-zoo change)."""

from __future__ import annotations


def check_settings(settings: dict, where: str, cfg: dict, role: str) -> None:
    """DAG-time check of a ``train:`` block (role: 'pretrain' or 'continual')."""


def add_commands(sub) -> None:
    """Register the toy-zoo subcommands on the ``ropelens`` parser."""
