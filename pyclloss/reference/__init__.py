"""Plain-PyTorch implementations: the spec, the test oracle, the fallback backend."""
