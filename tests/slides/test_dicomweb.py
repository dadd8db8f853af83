"""DICOM whole slides over DICOMweb: a real Orthanc with its DICOMweb plugin on 127.0.0.1 holding the fixture
DICOM WSI series (tests/fixtures/slides/dicom-cmu-1-small-region), read through wsidicom + dicomweb-client."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.errors import SlideError
from loupe.slides import describe_slide, open_slide
from loupe.slides.cache import file_identity
from loupe.slides.dicomweb import DicomWebReader
from loupe.slides.urls import SlideURL

from ..helpers.orthanc import Orthanc, orthanc_available

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed (.ci/run)")
wsidicom = pytest.importorskip("wsidicom")
pytest.importorskip("dicomweb_client")

FOLDER = "dicom-cmu-1-small-region"


@pytest.fixture(scope="module")
def series(slides_dir, tmp_path_factory):
    """(Orthanc, study UID, series UID) with the fixture series uploaded through the REST API."""
    with wsidicom.WsiDicom.open(slides_dir / FOLDER) as local:
        study, series_uid = str(local.uids.study_instance), str(local.uids.series_instance)
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for path in sorted((slides_dir / FOLDER).glob("*.dcm")):
            server.upload(path)
        yield server, study, series_uid


def _url(server, study, series, auth=""):
    return f"dicomweb+http://{auth}127.0.0.1:{server.port}/dicom-web/studies/{study}/series/{series}"


def test_a_dicomweb_series_gives_the_local_files_pixels(series, slides_dir):
    server, study, uid = series
    with open_slide(_url(server, study, uid)) as remote, wsidicom.WsiDicom.open(slides_dir / FOLDER) as local:
        assert isinstance(remote, DicomWebReader)
        assert remote.dimensions == (2220, 2967) and remote.mpp == pytest.approx(0.499)
        assert len(remote.level_dimensions) == len(local.levels)
        for level, (x, y, w, h) in [(0, (300, 500, 400, 300)), (1, (100, 200, 300, 300))]:
            want = np.asarray(local.read_region((x, y), local.levels[level].level, (w, h)))[..., :3]
            np.testing.assert_array_equal(remote._read_level_rgb(level, x, y, w, h), want)
    with open_slide(slides_dir / FOLDER) as openslide_reader, open_slide(_url(server, study, uid)) as remote:
        np.testing.assert_array_equal(  # level 0 through OpenSlide is the same too
            remote.read_region(300, 500, (400, 300), (400, 300)),
            openslide_reader.read_region(300, 500, (400, 300), (400, 300)),
        )


def test_a_wrong_series_fails_naming_the_redacted_url(series):
    server, study, _ = series
    with pytest.raises(SlideError) as info:
        open_slide(_url(server, study, "1.2.3.4.5", auth="alice:hunter2@"))
    message = str(info.value)
    assert "1.2.3.4.5" in message and f"127.0.0.1:{server.port}" in message and "hunter2" not in message


def test_dicomweb_urls_name_study_and_series_and_are_cached_by_them(series):
    server, study, uid = series
    url = SlideURL(_url(server, study, uid, auth="u:pw@"))
    assert url.stem == uid and url.suffix == ""  # the slide id is the series UID, dots and all
    assert file_identity(url) == {"url": url.without_credentials(), "dicomweb": True}
    with pytest.raises(SlideError, match="names no study and series"):
        SlideURL(f"dicomweb+http://127.0.0.1:{server.port}/dicom-web/studies/{study}")
    desc = describe_slide(str(url), magnifications=["5x", "20x"])
    assert desc["backend"] == "DicomWebReader" and "pw" not in desc["path"]
