"""What a model costs in memory: its GGUF header read safely, the estimate, and measurements."""
