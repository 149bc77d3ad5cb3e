"""Which code runs (fleet_ingress.release): the digest of the package's source."""

from __future__ import annotations

import shutil
from pathlib import Path

import fleet_ingress
from fleet_ingress.release import code_digest, version_line


def test_the_same_source_has_the_same_digest_anywhere_and_any_change_another(tmp_path: Path):
    package = Path(fleet_ingress.__file__).parent
    copy = tmp_path / "a" / "fleet_ingress"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__pycache__").mkdir()  # compiled files are not the source
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0" * 16)
    (copy / "stray.pyc").write_bytes(b"\0" * 16)
    assert code_digest(copy) == code_digest(package) == code_digest()
    changed = tmp_path / "b" / "fleet_ingress"
    shutil.copytree(copy, changed)
    (changed / "core" / "routing.py").write_text(
        (changed / "core" / "routing.py").read_text() + "\n# one more line\n"
    )
    assert code_digest(changed) != code_digest(package)
    moved = tmp_path / "c" / "fleet_ingress"  # the same bytes under another name
    shutil.copytree(copy, moved)
    (moved / "core" / "routing.py").rename(moved / "core" / "routing2.py")
    assert code_digest(moved) != code_digest(package)


def test_version_line_names_the_version_and_the_code():
    assert version_line() == f"fleet-ingress {fleet_ingress.__version__} (code {code_digest()})"


def test_a_template_is_part_of_the_code(tmp_path: Path):
    package = Path(fleet_ingress.__file__).parent
    copy = tmp_path / "fleet_ingress"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    unit = next((copy / "config" / "templates").iterdir())
    unit.write_text(unit.read_text() + "\n")
    assert code_digest(copy) != code_digest(package)
