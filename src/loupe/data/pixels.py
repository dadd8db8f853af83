"""The pixel source every model reads through: sampled cells (:class:`CellReader`) and whole images
(:class:`WholeImageReader`) of one catalog's slides, with the time spent reading them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from loupe.data.catalog import SlideCatalog
from loupe.data.embeddings import EmbeddingCache
from loupe.data.loading import CellReader
from loupe.data.whole_image import REGION_CACHE_BYTES, WholeImageReader
from loupe.errors import SlideReadError, describe_error
from loupe.models.interface import WholeImage


class SlidePixels:
    """A :class:`~loupe.models.interface.PixelSource` over ``catalog``: cells are read by ``threads`` threads;
    whole images (one magnification only) are read in parallel chunks, cropped to the tissue's bounding box with
    ``crop_to_tissue``; one of more than ``max_image_mb`` MB (uint8 RGB; None: no limit, 0: every image) is returned
    as a :class:`~loupe.data.whole_image.SlideRegions` read crop by crop as streamed tiles need it, through a cache
    of ``cache_mb`` MB. Readers are made on first use; :meth:`close` stops their threads. ``embeddings``: a cache of
    a frozen patch encoder's embeddings, consulted before any patch is read."""

    def __init__(
        self,
        catalog: SlideCatalog,
        threads: int = 8,
        crop_to_tissue: bool = True,
        embeddings: EmbeddingCache | None = None,
        max_image_mb: int | None = None,
        cache_mb: int = REGION_CACHE_BYTES // 10**6,
    ) -> None:
        self.catalog = catalog
        self.embeddings = embeddings
        """Cached patch embeddings of a frozen encoder (models with a frozen patch network read through it)."""
        self.threads = threads
        self.crop_to_tissue = crop_to_tissue
        self.max_image_mb = max_image_mb
        self.cache_mb = cache_mb
        self._cells: CellReader | None = None
        self._whole: WholeImageReader | None = None

    def cells(self, slides: Sequence[int], cells: Tensor) -> Tensor:
        if self._cells is None:
            self._cells = CellReader(self.catalog, self.threads)
        return self._cells(slides, cells)

    def whole(self, slide: int, valid: np.ndarray | None) -> WholeImage:
        """Slide ``slide``'s whole image; a read that fails (a corrupt tile, a file truncated or replaced while in
        use) raises a :class:`~loupe.errors.SlideReadError` naming the slide, so training can skip it alone. An image
        returned as regions raises the same from the crop that fails, which may come in the backward pass."""
        if self._whole is None:
            self._whole = WholeImageReader(
                self.catalog,
                self.threads,
                crop_to_tissue=self.crop_to_tissue,
                max_image_bytes=None if self.max_image_mb is None else self.max_image_mb * 10**6,
                cache_bytes=self.cache_mb * 10**6,
            )
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
