"""Compatibility training: composable losses, the training loop, and M(g,g)/M(q,g)/M(q,q)."""
