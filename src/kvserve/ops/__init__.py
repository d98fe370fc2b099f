"""Device kernels behind small functions, each with a torch-native reference (see cpu_ops.py)."""
