"""Compiled kernels. Each module holds one family; kernels take and return arrays."""
