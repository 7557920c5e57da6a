"""The one way a benchmark script writes its JSON record (benchmarks/ is no package: scripts import this by name)."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("d3ray.bench")


def write_json(path: str, record: dict) -> None:
    """``record`` as indented JSON at ``path`` (folders made as needed), logged with its wall time if it has one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    wall = record.get("wall_s")
    logger.info("wrote %s%s", path, f" in {wall:.0f} s" if isinstance(wall, (int, float)) else "")
