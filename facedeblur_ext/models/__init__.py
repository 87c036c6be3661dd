"""facedeblur_ext.models."""

from .cfmd import CFMDGenerator, UNetDiscriminator, load_generator

__all__ = ["CFMDGenerator", "UNetDiscriminator", "load_generator"]
