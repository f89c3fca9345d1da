"""Triton kernels of the fused backend; the host side (launches, autograd, custom op) is
`smooth_infonce.triton_kernel`. Importing this package needs `triton`."""
