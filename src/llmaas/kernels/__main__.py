"""`python -m llmaas.kernels`: compile (or find) the native kernels now and say where they are."""

from llmaas.kernels import load_kernels

print(f"llmaas kernels ready: {load_kernels().__file__}")
