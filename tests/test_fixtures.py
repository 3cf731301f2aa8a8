"""The test fixtures are the bytes their stored results were produced from (tests/fixtures/README.md)."""

from __future__ import annotations

import hashlib
import pathlib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _manifest() -> dict[str, str]:
    rows = (line.split(maxsplit=1) for line in (FIXTURES / "SHA256SUMS").read_text().splitlines())
    return {name.strip(): digest for digest, name in rows}


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_fixture_file_has_the_bytes_its_manifest_records():
    manifest = _manifest()
    changed = [name for name, digest in manifest.items() if _sha256(FIXTURES / name) != digest]
    assert not changed, f"fixture files changed (restore them byte for byte, see tests/fixtures/README.md): {changed}"


def test_every_fixture_file_is_in_the_manifest():
    on_disk = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()}
    unlisted = on_disk - set(_manifest()) - {"SHA256SUMS", "README.md"}
    assert not unlisted, f"fixture files missing from tests/fixtures/SHA256SUMS: {sorted(unlisted)}"
