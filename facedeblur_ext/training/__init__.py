"""facedeblur_ext.training."""
