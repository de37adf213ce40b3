"""The predict job and its stages (``job``, ``inputs``, ``sinks``), the Predictor (TTA, MC dropout,
ensembles), tiling and stitching. Image and slide readers are :mod:`kerasnuc.io.readers`."""
