"""Writers: GeoJSON, CSV, TIFF/PNG masks, overlays."""
