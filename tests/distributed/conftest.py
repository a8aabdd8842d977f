import sys
from pathlib import Path

# the spawned workers import test modules by name; make tests/helpers.py importable everywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
