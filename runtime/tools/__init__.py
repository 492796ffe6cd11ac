"""Offline tools around the serving core: the quantizer (`evalpipe quantize`, with its activation calibration),
the demo model and synthetic checkpoints (`evalpipe model build|synth-deepseek`), the safetensors shard writer
they share, and `standalone` (one sequence through a model without the engine, for tests and calibration)."""
