#!/usr/bin/env python
"""Write tests/data/golden_outputs.safetensors: the outputs of tests/golden_cases.py with the current code.

Run once from the repository root (``PYTHONPATH=.:tests python tests/make_golden_outputs.py``) when a change is
*meant* to alter the numbers; tests/test_golden_outputs.py then checks later code against the file.
"""

from pathlib import Path

import torch
from golden_cases import all_cases, run_case
from safetensors.torch import save_file

PATH = Path(__file__).parent / "data" / "golden_outputs.safetensors"


def main() -> None:
    torch.set_num_threads(1)
    tensors = {}
    for method, family in all_cases():
        for key, value in run_case(method, family).items():
            tensors[f"{method}/{family}/{key}"] = value.contiguous()
    PATH.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(PATH))
    print(f"{len(tensors)} tensors written to {PATH}")


if __name__ == "__main__":
    main()
