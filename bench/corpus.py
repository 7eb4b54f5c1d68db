"""The offline text corpus used by the quality benchmarks.

Python's own reference documentation, as shipped with every CPython in ``pydoc_data.topics`` (the text of
``help('topic')``: ~80 topics, ~465k characters of English prose and code). Real, offline and identical on
every machine with the same Python version. Split by topic, deterministically: topics sorted by name, every
5th one (index % 5 == 0) is held out for evaluation, the rest is training text.
"""
from __future__ import annotations

import sys


def topics() -> dict[str, str]:
    import pydoc_data.topics as t

    return dict(sorted(t.topics.items()))


def corpus(split: str) -> str:
    """``split``: "train" (80 % of topics) or "heldout" (20 %)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    items = list(topics().items())
    keep = [text for i, (_, text) in enumerate(items) if (i % 5 == 0) == (split == "heldout")]
    return "\n\n".join(keep)


def describe() -> str:
    return f"pydoc_data.topics of Python {sys.version.split()[0]} (split by topic, every 5th held out)"


if __name__ == "__main__":
    for s in ("train", "heldout"):
        print(s, len(corpus(s)), "chars")
