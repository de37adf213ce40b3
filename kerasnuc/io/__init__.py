"""Files in and out: the formats kerasnuc reads and writes (numpy / OpenCV / tifffile).

* Readers: images and whole slides behind one region-reading interface (:mod:`.readers`) and
  tissue detection on their thumbnails (:mod:`.tissue`); GeoJSON polygons back into label maps
  (:func:`read_geojson_instances`).
* Writers: GeoJSON, CSV, TIFF/PNG masks, overlays, run summaries. Every writer is atomic
  (temporary sibling renamed into place); the slide writers (:class:`GeoJSONWriter`,
  :class:`CSVWriter`) take one tile at a time. Measurements come from
  :func:`kerasnuc.postprocess.measure.measure_instances`.
"""

from kerasnuc.io.geojson import (
    GeoJSONWriter,
    instance_features,
    mask_polygons,
    read_geojson_instances,
    write_geojson,
)
from kerasnuc.io.masks import (
    pyramid_shapes,
    read_label_tiff,
    write_class_tiff,
    write_instance_tiff,
    write_label_tiff,
)
from kerasnuc.io.overlay import draw_overlay, outline_mask, write_overlay
from kerasnuc.io.summary import build_summary, class_counts, write_summary
from kerasnuc.io.table import CSVWriter, write_csv

__all__ = [
    "CSVWriter",
    "GeoJSONWriter",
    "build_summary",
    "class_counts",
    "draw_overlay",
    "instance_features",
    "mask_polygons",
    "outline_mask",
    "pyramid_shapes",
    "read_geojson_instances",
    "read_label_tiff",
    "write_class_tiff",
    "write_csv",
    "write_geojson",
    "write_instance_tiff",
    "write_label_tiff",
    "write_overlay",
    "write_summary",
]
