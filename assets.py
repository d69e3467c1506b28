"""Chapter 3 (ClickHouse rows, live in every browser): the page's scripts, served by this server.

index.html loads Perspective's JavaScript and WebAssembly from the jsDelivr
CDN. Where the CDN cannot be reached (a locked-down office network, an
air-gapped machine), run this once after installing the requirements:

    .venv/bin/python assets.py

It downloads the pinned @perspective-dev packages from the npm registry,
checks each one against the sha512 written below (the same digests npm
records in a package-lock.json), and unpacks their `dist/` folders into
`assets/`. From then on perspective_server.py serves the page's scripts from
there, and the page makes no request outside this server. Delete `assets/`
to go back to the CDN.

The version is the one perspective-python is pinned to in requirements.txt:
the browser's code and the server's must match, or the page stays blank.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.3.0"
REGISTRY = "https://registry.npmjs.org"
CDN = "https://cdn.jsdelivr.net/npm/"
FOLDER = Path(__file__).with_name("assets")

# npm's `integrity` of each package's tarball at VERSION.
PACKAGES = {
    "client": "sha512-LhVDyYzZrSmtuU04qX+MzpnA1BKPEW9nMi4RPE6y3KiGAWwFFqEFgZKF233U8/Fx3v2URCijcwmXn0qTVfoPMQ==",
    "server": "sha512-UH3ADscynozVx42RF07DTBmPE/0PUwH+SS0cgvMLuLfBjtvnPm6msfOU0tHlgFnNZOHJO0q6RZ9WI5fD6wF07A==",
    "viewer": "sha512-zF2xRqk4DfemMJ0Y1CCFFQKSk6L+v/hcQCPs0jVUs3cwS73bOVRnz1Hl9V3rwpfXSviILS+66d2HIlllvyd2vg==",
    "viewer-datagrid":
        "sha512-edzgMCzhXcB+gfh7SoPnjVjzQxd5UB7O4RUZq+fB9dgSqh7KkdwTGz4XxHLr8VHhDB9cb8mbTmaVT4Mk32b9AQ==",
    "viewer-d3fc":
        "sha512-Su0pcno2RLnzotnMGLBSlLsCL3qE2BSTtso6KcUXFNO+Cbx2jzTo+5hDk+kcZtDYbMpZk/a7p+NoUhltL5qOGA==",
}


def package_folder(folder: Path, name: str) -> Path:
    """Where one package lives, laid out as its CDN URL is:
    assets/@perspective-dev/viewer@4.3.0/dist/... answers
    https://cdn.jsdelivr.net/npm/@perspective-dev/viewer@4.3.0/dist/..."""
    return folder / "@perspective-dev" / f"{name}@{VERSION}"


def installed(folder: Path = FOLDER) -> bool:
    """True when every package is unpacked (the last step of install())."""
    return all((package_folder(folder, name) / "dist").is_dir() for name in PACKAGES)


def check(tarball: bytes, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if actual != expected:
        raise ValueError(f"{algorithm} {actual[:16]}... is not the pinned {expected[:16]}...")


def unpack(tarball: bytes, into: Path) -> None:
    """Writes the tarball's package/dist/ files below `into`/dist, and nothing
    else: no path may leave the folder (a name with .. or an absolute path)."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[:2] != ("package", "dist") or ".." in parts:
                continue
            target = into.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())


def install(folder: Path = FOLDER, registry: str = REGISTRY, timeout: float = 60) -> None:
    for name, integrity in PACKAGES.items():
        url = f"{registry}/@perspective-dev/{name}/-/{name}-{VERSION}.tgz"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            tarball = response.read()
        try:
            check(tarball, integrity)
        except ValueError as error:
            raise ValueError(f"{url}: {error}") from None
        target = package_folder(folder, name)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was cut off
        unpack(tarball, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        print(f"@perspective-dev/{name}@{VERSION}: {len(tarball) >> 10:,} KiB, sha512 checked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download Perspective's browser code, so the page needs no CDN.")
    parser.add_argument("--registry", default=REGISTRY, help=f"npm registry (default {REGISTRY})")
    parser.add_argument("--again", action="store_true", help="download even if assets/ already has them")
    args = parser.parse_args(argv)
    if installed() and not args.again:
        print(f"Perspective {VERSION}'s browser code is already in {FOLDER.name}/")
        return 0
    try:
        install(registry=args.registry.rstrip("/"))
    except (OSError, ValueError, tarfile.TarError) as error:
        print(f"assets.py: could not download Perspective's browser code ({error}); the page keeps "
              f"loading it from {CDN}", file=sys.stderr)
        return 1
    print(f"done: perspective_server.py now serves the page's scripts from {FOLDER.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
