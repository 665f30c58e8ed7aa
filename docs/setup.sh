# Shared by the docs/*.sh figure scripts (sourced, with the script's WORK_DIR argument): run from the
# repository root with its .venv and MPI as root, in WORK_DIR (a fresh temporary one by default).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONPATH="$PWD"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
ranks=(mpirun -n 2 --oversubscribe python -m lsurf)
