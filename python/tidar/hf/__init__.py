"""The model side of TiDAR in Hugging Face: the "tidar" attention backend, the KV cache, the LM head on the rows
that need it, and the probe that proves a model runs exactly under the backend. Imports nothing above it."""
