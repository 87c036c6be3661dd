"""facedeblur_ext.losses."""
