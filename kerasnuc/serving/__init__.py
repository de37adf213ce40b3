"""SavedModel export, TF Serving config and warm-up, serving client."""
