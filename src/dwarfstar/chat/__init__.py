"""Pure text: request mapping, the official prompt renderer, the incremental output parser."""
