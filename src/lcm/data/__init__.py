"""Data sources: the embedded Fashion-MNIST default and (for distillation) user image–caption data."""
