"""facedeblur_ext.data."""
