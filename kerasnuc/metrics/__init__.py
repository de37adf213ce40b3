"""Instance, semantic, detection and count metrics (numpy)."""
