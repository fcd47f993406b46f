"""The quality corpus: the Python standard library's own sources, which every Python install has offline.

Files are the top-level `*.py` modules of `sysconfig.get_paths()["stdlib"]`, sorted by name; every 10th file (index
% 10 == 3) is held out, the rest is training text. The held-out file list ships with the model
(`data/heldout_files.txt`); evaluation reads those files from the running Python's stdlib (no third-party text is
shipped). The stdlib differs a little between Python versions: the shipped numbers were measured on Python 3.11,
the version of the project's CI machines.
"""

from __future__ import annotations

import os
import sysconfig
from importlib import resources
from pathlib import Path

HELDOUT_EVERY = 10
HELDOUT_OFFSET = 3
SAMPLE_BYTES = 65536  # held-out bytes evaluated by default


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Top-level stdlib modules, sorted: the deterministic file list."""
    return sorted(name for name in os.listdir(stdlib_root()) if name.endswith(".py"))


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, heldout) by position in the sorted list."""
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_OFFSET]
    heldout = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    return train, heldout


def read_files(files: list[str]) -> bytes:
    """The files' bytes concatenated, each followed by a blank line (files missing in this Python are skipped)."""
    root = stdlib_root()
    chunks = []
    for name in files:
        path = root / name
        if path.is_file():
            chunks.append(path.read_bytes() + b"\n\n")
    return b"".join(chunks)


def _data() -> resources.abc.Traversable:
    return resources.files("moe_compile.quality").joinpath("data")


def shipped_heldout_files() -> list[str]:
    return _data().joinpath("heldout_files.txt").read_text().split()


def heldout_bytes(max_bytes: int = SAMPLE_BYTES) -> bytes:
    """The first `max_bytes` bytes of the shipped held-out file list, read from this Python's stdlib."""
    text = read_files(shipped_heldout_files())[:max_bytes]
    if not text:
        raise FileNotFoundError(f"none of the held-out stdlib files were found under {stdlib_root()}")
    return text


def train_bytes() -> bytes:
    """Training text: every stdlib file not in the shipped held-out list."""
    held = set(shipped_heldout_files())
    return read_files([f for f in stdlib_files() if f not in held])
