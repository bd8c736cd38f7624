"""Quantization: affine maths, calibration, weight-only, post-training static/dynamic int8."""
