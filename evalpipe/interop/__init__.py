"""Interop with EvalScope and lm-eval: re-grade our journals with their graders (`crosscheck`) and import their
runs as journals (`import`). Neither harness is imported by the core install; see harnesses.py."""
