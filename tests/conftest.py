import copy
import gc

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two matrices of different sizes (eligible for SGG), a bias and a norm (never grouped)."""

    def __init__(self, n_in: int = 12, hidden: int = 24, n_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, n_out, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def make_net(seed: int = 0, dtype=torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def twin(model):
    return copy.deepcopy(model)


@pytest.fixture
def net():
    return make_net()


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """The data checks' cache (llava_sgg.data.cache) in this session's temporary folder, not ~/.cache:
    every test's data lives in a new folder, so the user's cache would only fill up with its entries."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LLAVA_SGG_CACHE", str(tmp_path_factory.mktemp("llava_sgg_cache")))
    yield
    patch.undo()


def pytest_collection_finish(session):
    """Freeze what collection built (torch, transformers, every test module: hundreds of thousands of
    objects) out of the garbage collector's reach. Trainer.train calls gc.collect() (accelerate's
    free_memory) several times per training test, and each full pass would walk that whole heap."""
    gc.collect()
    gc.freeze()
