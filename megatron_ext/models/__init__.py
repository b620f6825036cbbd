"""Model families built on megatron-core: one module per family, each with its spec and builder."""
