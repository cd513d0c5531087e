#!/usr/bin/env bash
# Kills at random moments (see scripts/chaos.py): scripts/chaos_train.sh N [--seed S] [--kinds train,export,gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/chaos.py "$@"
