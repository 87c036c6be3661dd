"""Subcommands of the ``facedeblur`` CLI (see ``facedeblur_ext.cli``)."""
