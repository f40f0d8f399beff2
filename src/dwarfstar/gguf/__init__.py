"""The GGUF file contract: names and metadata keys, the memory-mapped reader, the writer."""
