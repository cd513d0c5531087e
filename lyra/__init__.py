"""lyra: fine-tune a small chat model (Qwen3-0.6B by default) into a persona chatbot with QLoRA,
configured by Hydra. The character is a config group (lyra/conf/persona/); the default one is shipped.

Train:  python -m lyra.train experiment=smoke
"""

import logging as _logging

from lyra.paths import register_resolvers

__version__ = "0.1.0"

# On AVX512-BF16 CPUs, importing bitsandbytes tries to fetch a faster 4-bit kernel from the `kernels`
# hub and logs a warning when it cannot (always, offline). Its own CPU kernel still works, so the line
# is noise that would precede every one-line `lyra: error:`.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

register_resolvers()  # ${lyra.asset:NAME} in persona files, wherever a config is composed or loaded
