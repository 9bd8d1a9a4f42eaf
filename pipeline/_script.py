"""For every `python pipeline/<script>.py`: Python puts pipeline/ first on `sys.path`; the project root must be
importable instead (a clean clone is not necessarily pip-installed), so it takes that place."""
import sys
from pathlib import Path


def put_project_root_first() -> None:
    root = Path(__file__).resolve().parents[1]
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(root)
    elif str(root) not in sys.path:
        sys.path.insert(0, str(root))
