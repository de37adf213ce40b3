"""Model builders, one module per method."""
