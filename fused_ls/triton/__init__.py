"""Triton kernels. Importing this package needs a working Triton; fused_ls.backends guards it."""
