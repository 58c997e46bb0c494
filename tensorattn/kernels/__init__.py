"""Pure-functional attention kernels: `api` is the one checked entry point, `spine` the
normalised call they share, `configs` their typed options."""
