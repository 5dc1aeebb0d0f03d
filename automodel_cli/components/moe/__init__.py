"""Mixture-of-experts building blocks: the router's balance loss and expert-load metrics, the
expert kernels (grouped GEMM with a loop fallback) and expert parallelism (experts sharded over
data-parallel ranks, tokens exchanged with all-to-all)."""
