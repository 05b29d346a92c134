"""Benchmarks: flaxtl beside Keras 3 on TensorFlow (run.py), GPU step (gpu_step.py)."""
