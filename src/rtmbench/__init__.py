"""rtmbench: benchmark and regression harness for RTMDet inference engines."""

__version__ = "0.1.0"
