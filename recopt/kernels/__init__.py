"""Triton kernels (no dispatch policy here; see recopt.ops). Importing a kernel
module requires triton."""
