"""What the GPU-tier test files share: their marks (skipped without CUDA, or under DeepSpeed's CPU accelerator) and
`tests/` on sys.path, so that they import `helpers` under pytest and as scripts (the device machine runs them as
`python tests/gpu/<file>.py`)."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("DS_ACCELERATOR") == "cpu",
                       reason="DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator; run `make test-gpu`"),
]
