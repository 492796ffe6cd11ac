"""Small CausalLM implementations for fast engine and server tests (not model families to serve)."""
