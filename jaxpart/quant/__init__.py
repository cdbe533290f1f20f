"""Quantized weights and KV cache: NumPy quantizers (numeric) and the JAX dequantizing ops."""
