"""lyra: turn Qwen3-0.6B into the persona chatbot 萊拉 (Lyra) with QLoRA, configured by Hydra.

Train:  python -m lyra.train experiment=smoke
"""

__version__ = "0.1.0"

import logging as _logging

# On AVX512-BF16 CPUs, importing bitsandbytes tries to fetch a faster 4-bit kernel from the `kernels`
# hub and logs a warning when it cannot (always, offline). Its own CPU kernel still works, so the line
# is noise that would precede every one-line `lyra: error:`.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
