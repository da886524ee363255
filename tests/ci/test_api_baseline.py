"""CI's `buf breaking` step compares the protos with the released API
(.ci/api-baseline.txtpb): it passes for the protos as they are and catches a
removed field (a clean clone of main has no other branch to compare with, so
this baseline is what the check stands on)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".ci" / ".buf" / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / ".ci" / "api-baseline.txtpb"


def _buf() -> Path:
    if not BUF.exists():
        message = f"buf is not installed at {BUF} (bash .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return BUF


def _breaking(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_buf()), "breaking", "--against", str(BASELINE)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_protos(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def test_the_protos_are_compatible_with_the_released_api(tmp_path: Path) -> None:
    result = _breaking(_copy_protos(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_removed_field_is_caught(tmp_path: Path) -> None:
    tree = _copy_protos(tmp_path)
    proto = tree / "protos" / "keyplane" / "v1" / "sidecar_service.proto"
    text = proto.read_text()
    assert "uint64 resume_version = 2;" in text
    proto.write_text(text.replace("uint64 resume_version = 2;", ""))
    result = _breaking(tree)
    assert result.returncode != 0
    assert "resume_version" in result.stdout + result.stderr
