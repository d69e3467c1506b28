"""assets.py: Perspective's browser code, pinned and checked, for a page that needs no CDN.

The download runs against the real npm registry (the suite already needs it
for `npm ci`). The pins must be the version and the packages index.html loads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile

import pytest

import assets
from test_versions import ROOT, pinned_python_version


def test_the_pins_are_the_page_s_packages_at_the_python_version():
    assert assets.VERSION == pinned_python_version()
    loaded = set(re.findall(r"https://cdn\.jsdelivr\.net/npm/@perspective-dev/([a-z0-9-]+)@",
                            (ROOT / "index.html").read_text()))
    assert loaded and loaded <= set(assets.PACKAGES)


def tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_tarball_that_is_not_the_pinned_one_is_refused():
    good = tarball({"package/dist/a.js": b"ok"})
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(good).digest()).decode()
    assets.check(good, integrity)
    with pytest.raises(ValueError, match="is not the pinned"):
        assets.check(tarball({"package/dist/a.js": b"tampered"}), integrity)


def test_only_dist_files_are_unpacked_and_none_outside_the_folder(tmp_path):
    data = tarball({"package/dist/cdn/a.js": b"a", "package/package.json": b"{}",
                    "package/dist/../../escape.js": b"x", "/etc/evil": b"x"})
    assets.unpack(data, tmp_path / "pkg")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["pkg/dist/cdn/a.js"]


def test_install_downloads_every_package_laid_out_as_the_cdn(tmp_path):
    assert not assets.installed(tmp_path)
    assets.install(tmp_path)
    assert assets.installed(tmp_path)
    page = (ROOT / "index.html").read_text()
    for path in re.findall(rf"{re.escape(assets.CDN)}(@perspective-dev/[a-z0-9-]+@{assets.VERSION}/[^\"']+)", page):
        assert (tmp_path / path).is_file(), path
