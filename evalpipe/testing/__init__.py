"""Test helpers shipped with the package (the fake OpenAI server)."""
