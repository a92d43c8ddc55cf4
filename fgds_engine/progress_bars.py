"""The one optional progress-bar wrapper (tqdm), a leaf."""

from __future__ import annotations


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """tqdm over ``iterable`` when ``enabled`` (the one optional progress-bar wrapper), else the iterable
    itself; with no iterable, a manual bar or None."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
