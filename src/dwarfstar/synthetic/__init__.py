"""Random-weight data of the real formats and architecture: valid blocks of every GGML format
(``blocks``) and whole GGUF models (``models``) for the demo, the benchmarks and the tests.
Nothing here converts a checkpoint; of the library, only ``ds4 logits --demo`` reaches it."""
