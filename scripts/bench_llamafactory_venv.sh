#!/usr/bin/env bash
# A throwaway venv for the benchmark's `llamafactory` peer (LLaMA-Factory pins transformers<=5.6,
# trl<=0.24, peft<=0.18.1, accelerate<=1.11, datasets<=4.0, which lyra's venv does not have).
#
#   bash scripts/bench_llamafactory_venv.sh [VENV_DIR]        # default /tmp/lyra-bench-llamafactory
#   python scripts/bench_train.py --llamafactory-python VENV_DIR/bin/python ...
#
# The venv holds only LLaMA-Factory's pinned packages; everything else (torch, bitsandbytes, hydra,
# lyra's own deps) is read from the current venv through a .pth line, so no second torch is
# downloaded. LLaMA-Factory 0.9.5 imports torchaudio at start-up for audio inputs only, and PyPI has
# no torchaudio build for every torch (none for 2.13), so an empty stand-in module is written when
# the real one cannot load. Text-only training never touches it.
set -euo pipefail
VENV=${1:-/tmp/lyra-bench-llamafactory}
PY=${PYTHON:-python}  # the venv whose torch/bitsandbytes/lyra deps the peer reuses
BASE_PY=$("$PY" -c 'import sys; print(sys.executable)')
BASE_SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE_INTERP=$("$PY" -c 'import sys; print(sys._base_executable)')

"$BASE_INTERP" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BASE_SITE" > "$SITE/zz_lyra_base.pth"
"$VENV/bin/python" -m pip install -q --retries 0 --timeout 10 --no-deps \
    "llamafactory==0.9.5" "transformers==5.6.0" "trl==0.24.0" "peft==0.18.1" "accelerate==1.11.0" \
    "datasets==4.0.0" "tokenizers==0.22.2" "huggingface-hub>=1.5,<2" "fsspec[http]<=2025.3.0" "dill<0.3.9" \
    "multiprocess<0.70.17" "tyro<0.9.0" fire sse-starlette einops
if ! "$VENV/bin/python" -c 'import torchaudio' 2>/dev/null; then
    mkdir -p "$SITE/torchaudio"
    printf '"""Empty stand-in: LLaMA-Factory imports torchaudio for audio inputs only."""\n__version__ = "0.0.0+stub"\n' \
        > "$SITE/torchaudio/__init__.py"
fi
"$VENV/bin/python" -c 'import llamafactory.train.tuner, transformers; print("llamafactory ready:", transformers.__version__)'
echo "$VENV/bin/python (base venv: $BASE_PY)"
