"""Dataset layout, importers, targets, points, stain tools, augmentation, sampling, tf.data."""

from kerasnuc.data.dataset import Dataset, DatasetWriter, Sample

__all__ = ["Dataset", "DatasetWriter", "Sample"]
