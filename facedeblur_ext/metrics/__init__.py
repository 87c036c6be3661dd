"""facedeblur_ext.metrics."""
