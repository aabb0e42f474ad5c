"""A tiny GPT-2 (same architecture and code path as ``gpt2``) that builds offline in seconds."""
