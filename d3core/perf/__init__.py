"""GPU accounting without a GPU: published device figures, fake-CUDA dry runs at real shapes, op costs, rooflines."""
