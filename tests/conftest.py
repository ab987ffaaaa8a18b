# Tests never touch the network: open_clip would otherwise retry a hub download for ~46 s.
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n's processes: one thread each, or they thrash
    os.environ["OMP_NUM_THREADS"] = "1"  # (read by torch at import, and by the subprocesses tests start)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

from toy import TINY_CLIP as TINY  # a tiny CLIP with the real vocabulary, shared with every --quick run


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: about 10 s or more on 2 cores (pytest -m 'not slow' skips them)")


@pytest.fixture
def tiny_clip():
    import model
    torch.manual_seed(0)
    return model.build_clip(config=TINY).eval()


def randomize_adapters(m, std=0.02):
    """Fresh adapters add exactly zero; give their zero-initialised up-projections random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A small ToyFashion (358 train / 42 val products, 32 px) shared by the trainer and evaluation tests;
    tests that damage data copy it first."""
    import toy
    out = str(tmp_path_factory.mktemp("toy"))
    toy.make_toy(out, seed=0, products=400, size=32)  # ROOT/products and ROOT/triplets
    return out
