"""Ordinary code prompts: openings of the kind people type, written for the decode benchmarks and never used to tune
the planner or to train a model (not from the demo or the training corpus' held-out prompts). The benchmarks time
them; the model card (``tidar train --evaluate DIR --card``) measures the bundled model's continuations of them.
Grouped by class so results can be reported per class with their spread, not only as one mean."""

from __future__ import annotations

PROMPTS: dict[str, list[str]] = {
    "function": [
        "def read_config(path):\n",
        "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
        "def flatten(items):\n    result = []\n",
        'def chunked(iterable, size):\n    """Yield lists of ``size`` items."""\n',
        "def merge_dicts(a, b):\n",
        "def is_prime(n):\n    if n < 2:\n",
        "def load_json(filename, default=None):\n    try:\n",
        "def format_bytes(num):\n    for unit in ",
        "def retry(func, attempts=3, delay=1.0):\n",
        "async def fetch(session, url):\n",
        'def normalize_path(path, base=None):\n    """Return an absolute, normalized path.',
        "def count_words(text):\n    counts = {}\n    for word in text.split():\n",
    ],
    "class": [
        "class Stack:\n    def __init__(self):\n",
        'class Node:\n    """A node of a binary tree."""\n\n    def __init__(self, value, left=None, right=None):\n',
        "class Config(object):\n",
        "class LRUCache:\n    def __init__(self, capacity):\n",
        "class HTTPError(Exception):\n",
        'class Timer:\n    """Context manager that measures elapsed time."""\n\n    def __enter__(self):\n',
        "class Point:\n    __slots__ = ('x', 'y')\n\n",
        "class EventEmitter:\n    def __init__(self):\n        self._handlers = {}\n\n"
        "    def on(self, name, handler):\n",
        "class Matrix:\n    def __init__(self, rows):\n        self.rows = rows\n\n    def __add__(self, other):\n",
        "class Logger:\n    LEVELS = ",
    ],
    "module": [
        "import os\nimport sys\n\n\ndef main():\n",
        '#!/usr/bin/env python3\n"""Command line tool to ',
        "from collections import defaultdict\n\n",
        "import re\n\nPATTERN = re.compile(",
        '"""Utilities for working with files."""\n\nimport os\n',
        "import unittest\n\n\nclass TestParser(unittest.TestCase):\n    def setUp(self):\n",
        "if __name__ == '__main__':\n",
        "__all__ = [",
    ],
    "body": [
        "    def __repr__(self):\n        return ",
        "        for key, value in sorted(options.items()):\n",
        "    if not isinstance(name, str):\n        raise TypeError(",
        "        with open(path, 'rb') as f:\n            data = f.read()\n",
        "    result = {}\n    for line in lines:\n        line = line.strip()\n",
        "    @property\n    def name(self):\n",
        "        except (OSError, ValueError) as e:\n",
        "    def close(self):\n        if self._closed:\n",
    ],
}


def all_prompts() -> list[tuple[str, str]]:
    """``(class, prompt)`` pairs in a fixed order."""
    return [(cls, p) for cls, ps in PROMPTS.items() for p in ps]
