"""kerasnuc: nuclei segmentation, classification and measurement for histopathology images."""

__version__ = "0.1.0"
