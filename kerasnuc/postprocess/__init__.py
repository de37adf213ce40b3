"""Probability maps -> instance and class maps (numpy / scikit-image), threshold tuning."""
