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


@pytest.fixture
def compiled_graphs(monkeypatch):
    """--torch_compile with a recording backend in place of inductor: dynamo traces the UNet as it would for real
    (graph breaks, guards, one graph per shape and grad mode), then the graphs run eagerly, so a test needs no
    minutes of code generation. Yields the list that gets one entry per graph built: whether grad was on."""
    import torch
    import torch._dynamo

    graphs, real = [], torch.nn.Module.compile

    def backend(gm, example_inputs):
        graphs.append(torch.is_grad_enabled())
        return gm.forward

    def compile(self, *args, **kwargs):
        return real(self, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    limit = torch._dynamo.config.recompile_limit  # --torch_compile raises it
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()  # no graph made with this backend outlives the test
    torch._dynamo.config.recompile_limit = limit
