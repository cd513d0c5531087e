"""lyra: turn Qwen3-0.6B into the persona chatbot 萊拉 (Lyra) with QLoRA, configured by Hydra.

Train:  python -m lyra.train experiment=smoke
"""

__version__ = "0.1.0"
