"""facedeblur_ext.models."""
