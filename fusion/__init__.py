"""fusion: compose concept adapters trained on disjoint spectral bands (see README)."""
