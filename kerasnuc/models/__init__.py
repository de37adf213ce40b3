"""Model builders, one module per method; ``maps`` runs a model on whole images (image ->
probability maps) and ``freeze`` holds the encoder freeze schedule of fine-tuning."""
