"""loupe: joint spatial and magnification attention sampling for gigapixel histopathology."""

__version__ = "0.2.0.dev0"
