"""Graph passes: the contract (base), the registry, the manager, and built-in passes."""
