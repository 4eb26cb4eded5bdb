"""Value retrieval for LiVO (docs/methods.md#value-retriever)."""
