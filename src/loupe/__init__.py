"""loupe: joint spatial and magnification attention sampling for gigapixel histopathology."""

__version__ = "0.1.0"
