"""The serving engine: scheduler, paged KV cache, model runner and sampler behind one step loop.

Data flows one way per step: Scheduler picks sequences and token counts -> ModelRunner runs one ForwardBatch
and returns logits -> Sampler picks tokens -> OutputProcessor turns them into text deltas and finish reasons.
"""
