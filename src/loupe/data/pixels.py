"""The pixel source every model reads through: sampled cells (:class:`CellReader`) and whole images
(:class:`WholeImageReader`) of one catalog's slides, with the time spent reading them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from loupe.data.catalog import SlideCatalog
from loupe.data.embeddings import EmbeddingCache
from loupe.data.loading import CellReader
from loupe.data.whole_image import WholeImageReader
from loupe.errors import SlideReadError, describe_error
from loupe.models.interface import WholeImage


class SlidePixels:
    """A :class:`~loupe.models.interface.PixelSource` over ``catalog``: cells are read by ``threads`` threads;
    whole images (one magnification only) are read in parallel chunks, cropped to the tissue's bounding box with
    ``crop_to_tissue``. Readers are made on first use; :meth:`close` stops their threads. ``embeddings``: a cache of
    a frozen patch encoder's embeddings, consulted before any patch is read."""

    def __init__(
        self,
        catalog: SlideCatalog,
        threads: int = 8,
        crop_to_tissue: bool = True,
        embeddings: EmbeddingCache | None = None,
    ) -> None:
        self.catalog = catalog
        self.embeddings = embeddings
        """Cached patch embeddings of a frozen encoder (models with a frozen patch network read through it)."""
        self.threads = threads
        self.crop_to_tissue = crop_to_tissue
        self._cells: CellReader | None = None
        self._whole: WholeImageReader | None = None

    def cells(self, slides: Sequence[int], cells: Tensor) -> Tensor:
        if self._cells is None:
            self._cells = CellReader(self.catalog, self.threads)
        return self._cells(slides, cells)

    def whole(self, slide: int, valid: np.ndarray | None) -> WholeImage:
        """Slide ``slide``'s whole image; a read that fails (a corrupt tile, a file truncated or replaced while in
        use) raises a :class:`~loupe.errors.SlideReadError` naming the slide, so training can skip it alone."""
        if self._whole is None:
            self._whole = WholeImageReader(self.catalog, self.threads, crop_to_tissue=self.crop_to_tissue)
        try:
            return self._whole(slide, valid)
        except (SlideReadError, MemoryError):
            raise
        except Exception as err:
            raise SlideReadError(f"reading the whole image failed: {describe_error(err)}", slide) from err

    @property
    def seconds(self) -> float:
        """Wall time spent reading pixels so far."""
        return sum(r.seconds for r in (self._cells, self._whole) if r is not None)

    @property
    def patches(self) -> int:
        """Cells read so far (each whole image counts its cells)."""
        return sum(r.patches for r in (self._cells, self._whole) if r is not None)

    def close(self) -> None:
        """Stop the reading threads (the timings stay readable)."""
        for reader in (self._cells, self._whole):
            if reader is not None:
                reader.close()

    def __enter__(self) -> SlidePixels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
