"""Frozen-backbone features: the inference engines (TensorFlow, OpenVINO) and the on-disk cache."""
