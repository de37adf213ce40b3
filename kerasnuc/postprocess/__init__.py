"""Probability maps -> instance and class maps (numpy / scikit-image), measurements, and the one
grid search of the post-processing settings (``common.grid_search``)."""
