"""Pure-functional attention kernels; `api` is the one checked entry point."""
