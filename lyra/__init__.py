"""lyra: fine-tune a small chat model (Qwen3-0.6B by default) into a persona chatbot with QLoRA,
configured by Hydra. The character is a config group (lyra/conf/persona/); the default one is shipped.

Train:  python -m lyra.train experiment=smoke
"""

from lyra.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()  # ${lyra.asset:NAME} in persona files, wherever a config is composed or loaded
