"""Keras 3 optimizers the papers need and Keras lacks, and the optimizer + learning-rate schedule
of a training run (``schedules``)."""
