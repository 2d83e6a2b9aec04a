"""Offline test setup: a temporary HF_HOME, offline flags, a local Hub-compatible server, and tiny
assets (SD-1.5-shaped pipeline, Pick-a-Pic-shaped parquet) built once per session."""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "examples", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import hub_server as _hub  # noqa: E402

# Before anything imports huggingface_hub: offline flags, temporary HF_HOME, HF_ENDPOINT -> local server.
_TMP_ROOT = Path(tempfile.mkdtemp(prefix="spin-tests-"))
atexit.register(shutil.rmtree, _TMP_ROOT, ignore_errors=True)
_hub.setup_test_environment(_TMP_ROOT)

import make_tiny_assets  # noqa: E402
import pytest  # noqa: E402
from hub_server import TEST_TOKEN, hub_online, hub_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{'pipeline', 'pickapic', 'captions'}: tiny local assets shared by the whole session."""
    return make_tiny_assets.build_all(tmp_path_factory.mktemp("assets"))
