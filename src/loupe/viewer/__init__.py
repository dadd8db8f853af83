"""`loupe view`: a local web viewer of a `loupe predict` output folder (or a run's evaluated split).

``cohort`` reads the folder (also while workers fill it), ``slide_data`` one slide's outputs and geometry,
``deepzoom`` makes Deep Zoom tiles over any :class:`loupe.slides.SlideReader`, ``layers`` the attention and
tissue images; ``app`` is the Starlette application and ``server`` runs it with uvicorn. Only ``app`` and
``server`` need the optional extra ``loupe[viewer]``.
"""

from __future__ import annotations

from loupe.viewer.cohort import Cohort, open_cohort

__all__ = ["Cohort", "open_cohort"]
