"""DeepSeek V4 Flash math: config, weights binding, forward pass and decode state."""
