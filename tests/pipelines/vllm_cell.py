"""Run one evaluation cell in this interpreter and write its record as JSON (used by test_vllm_baseline.py).

    python tests/pipelines/vllm_cell.py CONFIG_PICKLE CELL_PICKLE OUT_FILE

The config and cell are the dataclasses themselves, pickled (both interpreters run this checkout).

vLLM starts its engine with the spawn method, so this runs as a script under a ``__main__`` guard.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path


def main(cfg_file: str, cell_file: str, out_file: str) -> None:
    from pipelines.eval_cell import run_cell

    record = run_cell(pickle.loads(Path(cfg_file).read_bytes()), pickle.loads(Path(cell_file).read_bytes()))
    Path(out_file).write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
