"""Fast, pure unit tests: no processes, no Trainer.fit, each test runs in milliseconds."""

import os

# DeepSpeed picks its accelerator on first import; the unit tier never touches a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
