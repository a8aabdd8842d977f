import sys
from pathlib import Path

# the ported tests and their case script import tests/helpers.py and each other by name
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
