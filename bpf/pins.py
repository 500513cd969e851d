"""The paths of the datapath's pins under a pin root: the one place that builds them.

<root>/maps/<map name>       every map of the object (libbpf pins them by name)
<root>/programs/<name>       the two programs
<root>/tries/<trie id>       every live rule trie (inner map of np_rules)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from common.paths import DEFAULT_PIN_ROOT

MAPS_DIR = "maps"
PROGRAMS_DIR = "programs"
TRIES_DIR = "tries"

__all__ = ["DEFAULT_PIN_ROOT", "MAPS_DIR", "PROGRAMS_DIR", "TRIES_DIR", "PinPaths", "unpin"]


@dataclass(frozen=True)
class PinPaths:
    root: str = DEFAULT_PIN_ROOT

    @property
    def maps(self) -> str:
        return os.path.join(self.root, MAPS_DIR)

    @property
    def programs(self) -> str:
        return os.path.join(self.root, PROGRAMS_DIR)

    @property
    def tries(self) -> str:
        return os.path.join(self.root, TRIES_DIR)

    def map(self, name: str) -> str:
        return os.path.join(self.root, MAPS_DIR, name)

    def program(self, name: str) -> str:
        return os.path.join(self.root, PROGRAMS_DIR, name)

    def trie(self, trie_id: int) -> str:
        return os.path.join(self.root, TRIES_DIR, str(trie_id))

    def make_dirs(self) -> None:
        for d in (self.maps, self.programs, self.tries):
            os.makedirs(d, mode=0o700, exist_ok=True)


def unpin(root: str) -> None:
    """Remove every pin under ``root``. Maps and programs live on while attached or
    open elsewhere; this is for tests and a full uninstall."""
    shutil.rmtree(root, ignore_errors=True)
