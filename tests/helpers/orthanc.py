"""A real Orthanc (Debian's /usr/sbin/Orthanc) with its DICOMweb plugin on 127.0.0.1, started by a test.

A temporary JSON config puts its database under the test's folder and its HTTP and DICOM ports on free loopback
ports; files are uploaded through its REST API (POST /instances).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .nginx import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> bool:
    return os.access(ORTHANC, os.X_OK) and os.path.isfile(DICOMWEB_PLUGIN)


class Orthanc:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Orthanc:
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "loupe-test",
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        conf = self.workdir / "orthanc.json"
        conf.write_text(json.dumps(config))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen([ORTHANC, str(conf)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 20 s")

    def upload(self, path: Path) -> None:
        request = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
