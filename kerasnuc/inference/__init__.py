"""Predictor (TTA, MC dropout, ensembles), tiling and stitching, slide readers."""
