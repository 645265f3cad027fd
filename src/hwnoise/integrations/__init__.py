"""Integrations of hwnoise into other training engines, each an optional extra.

``hwnoise.integrations.verl`` (extra ``hwnoise[verl]``): operator noise in every verl worker, AQN
on the vLLM rollout engine's norm weights after each weight sync, W4A16 fake quantization of the
weights the rollout receives, through verl's own extension points.
"""
