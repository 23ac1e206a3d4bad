"""The decoding loop: its arguments, the planner and its cost model (slot timing), the draft sources (diffusion
blocks and context n-grams), and the drop-in Hugging Face ``generate``. Reads ``tidar.settings`` and ``tidar.hf``."""
