#!/usr/bin/env bash
# Re-resolve lyra's dependencies in a brand-new virtualenv and write the result to constraints.txt,
# the pins scripts/setup.sh installs. Run the test suite on the new pins before committing them.
#   bash scripts/refresh_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv_dir="$(mktemp -d /tmp/lyra-pins.XXXXXX)/venv"
python3 -m venv "$venv_dir"
# shellcheck disable=SC1091
source "$venv_dir/bin/activate"
LYRA_UNPINNED=1 bash scripts/setup.sh
{
  echo "# Exact versions the test suite passed with; scripts/setup.sh installs them (pip --constraint)."
  echo "# Regenerate: bash scripts/refresh_constraints.sh. torch is pinned without its +cpu/+cuXXX tag, so"
  echo "# one file serves CPU and GPU machines."
  python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v '^lyra' | sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins) from $venv_dir"
