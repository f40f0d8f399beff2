"""Random-weight data of the real formats and architecture: valid blocks of every GGML format
(``blocks``), whole GGUF models (``models``) for the benchmarks and the tests, and the cached
demo model behind every command's ``--demo`` (``demo``). Nothing here converts a checkpoint."""

from dwarfstar.synthetic.demo import demo_model_path

__all__ = ["demo_model_path"]
