#!/usr/bin/env bash
# byzfed: one entry for people.
#   ./launch.sh                      set up (first time) and run the demo federation
#   ./launch.sh test [pytest args]   run the whole test suite
#   ./launch.sh run SCENARIO.toml [--set key=value ...] [--tls] [--mtls]
#   ./launch.sh certs DIR [--host H ...] [--nodes NAME,NAME] [--scenario S.toml]   CA + server/client certificates
#   ./launch.sh enrol DIR [--nodes NAME,NAME] [--scenario S.toml]   enrolment key + DIR/<name>.secret (security.enrol)
#   ./launch.sh revoke RUN_DIR NAME [--cert PEM]   revoke a node (and its certificate) while the run goes on
#   ./launch.sh orchestrator SCENARIO.toml [--host H] [--port P] [--advertise-host A] [--token T]   orchestrator only
#   BYZFED_TOKEN=T ./launch.sh node --orchestrator HOST:PORT --name NAME [--tls-ca ca.pem]   one client node
#   ./launch.sh mpi -np N [--hostfile FILE] [-- extra mpirun args] SCENARIO.toml [--set key=value ...]
#       one mpirun runs the federation: rank 0 orchestrator, ranks 1..W-1 aggregation
#       (W = aggregation.ranks), the rest node hosts (README: "Running across machines with mpirun")
#   ./launch.sh sweep SWEEP.toml [--out DIR] [--parallel K] [--resume] [--mpi NP [--hostfile FILE]]
#       a grid of runs (README: "Sweeps and reports"): DIR/results.csv, DIR/report.md
#   ./launch.sh defenses | attacks | check SCENARIO.toml | setup | bench NAME
# Processes are started with exec or by the Python runner, which stops its
# children by PID; this script kills nothing by name.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.byzfed-installed"

setup() {
  if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
    return 0
  fi
  echo "byzfed: setting up $VENV (one time)" >&2
  local base="${PYTHON:-python3}"
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "byzfed needs Python >= 3.10 (found $("$base" --version 2>&1))" >&2; exit 1; }
  [ -x "$PY" ] || "$base" -m venv "$VENV"
  # torch first, pinned to the local CPU build: the project's torch>=2.3 range is
  # then satisfied and pip never pulls a CUDA build.
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test,mpi]"
  touch "$STAMP"
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup ;;
  demo)
    setup
    exec "$PY" -m orchestrator run "$ROOT/scenarios/demo.toml" "$@" ;;
  run)
    setup
    [ $# -ge 1 ] || { echo "usage: ./launch.sh run SCENARIO.toml [--set key=value ...]" >&2; exit 2; }
    exec "$PY" -m orchestrator run "$@" ;;
  orchestrator|serve)
    setup
    exec "$PY" -m orchestrator serve "$@" ;;
  node)
    setup
    exec "$PY" -m fednode "$@" ;;
  mpi)
    setup
    usage="usage: ./launch.sh mpi -np N [--hostfile FILE] [-- extra mpirun args] SCENARIO.toml [--set key=value ...]"
    MPIRUN="$VENV/bin/mpirun"
    [ -x "$MPIRUN" ] || MPIRUN="$(command -v mpirun)" || { echo "no mpirun (pip install -e '.[mpi]')" >&2; exit 2; }
    np=""; opts=(); extra=()
    while [ $# -gt 0 ]; do
      case "$1" in
        -np|-n|--np) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; np="$2"; shift 2 ;;
        --hostfile|-hostfile|--machinefile) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; opts+=(--hostfile "$2"); shift 2 ;;
        --)  # mpirun's own options, up to a second -- or the scenario file
          shift
          while [ $# -gt 0 ] && [ "$1" != "--" ] && [[ "$1" != *.toml ]]; do extra+=("$1"); shift; done
          [ "${1:-}" = "--" ] && shift ;;
        *) break ;;
      esac
    done
    [ -n "$np" ] && [ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
    [ "$(id -u)" = 0 ] && opts+=(--allow-run-as-root)
    # a node host killed takes only its nodes with it (without this Open MPI ends the job);
    # node hosts are not pinned to a core (their nodes inherit the binding), ranks follow the hostfile's slots
    opts+=(--oversubscribe --enable-recovery)
    [[ " ${extra[*]:-} " == *" --bind-to "* ]] || opts+=(--bind-to none)
    [[ " ${extra[*]:-} " == *" --map-by "* ]] || opts+=(--map-by slot)
    exec "$MPIRUN" -np "$np" "${opts[@]}" ${extra[@]+"${extra[@]}"} "$PY" -m orchestrator mpi "$@" ;;
  check)
    setup
    exec "$PY" -m orchestrator check "$@" ;;
  certs)
    setup
    [ $# -ge 1 ] || { echo "usage: ./launch.sh certs DIR [--host H ...] [--nodes NAME,NAME] [--scenario S.toml]" >&2; exit 2; }
    exec "$PY" -m orchestrator certs "$@" ;;
  enrol)
    setup
    [ $# -ge 1 ] || { echo "usage: ./launch.sh enrol DIR [--nodes NAME,NAME] [--scenario S.toml]" >&2; exit 2; }
    exec "$PY" -m orchestrator enrol "$@" ;;
  revoke)
    setup
    [ $# -ge 2 ] || { echo "usage: ./launch.sh revoke RUN_DIR NAME [--cert PEM] [--serial HEX] [--sha256 HEX] [--file F]" >&2; exit 2; }
    exec "$PY" -m orchestrator revoke "$@" ;;
  sweep)
    setup
    [ $# -ge 1 ] || { echo "usage: ./launch.sh sweep SWEEP.toml [--out DIR] [--parallel K] [--resume] [--mpi NP [--hostfile FILE]]" >&2; exit 2; }
    exec "$PY" -m orchestrator sweep "$@" ;;
  defenses)
    setup
    exec "$PY" -m orchestrator defenses ;;
  attacks)
    setup
    exec "$PY" -m attacks ;;
  bench)
    setup
    [ $# -ge 1 ] || { echo "usage: ./launch.sh bench NAME [args]  (NAME: $(cd "$ROOT/bench" && ls *.py | sed 's/\.py$//' | tr '\n' ' '))" >&2; exit 2; }
    name="$1"; shift
    exec "$PY" "$ROOT/bench/$name.py" "$@" ;;
  test)
    setup
    PYTHON="$PY" "$ROOT/proto/generate.sh" --check
    cd "$ROOT"
    exec "$PY" -m pytest -q "$@" ;;
  -h|--help|help)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    echo "unknown command '$cmd'; try ./launch.sh help" >&2; exit 2 ;;
esac
