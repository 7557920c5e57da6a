"""Run one evaluation cell in this interpreter and write its record as JSON (used by test_vllm_baseline.py).

    python tests/pipelines/vllm_cell.py CONFIG_JSON_FILE CELL_JSON_FILE OUT_FILE

vLLM starts its engine with the spawn method, so this runs as a script under a ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(cfg_file: str, cell_file: str, out_file: str) -> None:
    from pipelines.evaluate import run_cell

    record = run_cell(Path(cfg_file).read_text(), Path(cell_file).read_text())
    Path(out_file).write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
