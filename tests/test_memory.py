"""il.memory.SavedTensorBytes against tensors whose saved sizes are known."""

import gc

import torch

import implicit_layers as il


def test_counts_saved_storages_once_and_follows_their_release():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)  # 8000 bytes
    data = torch.randn(1000, dtype=torch.float64)
    with il.memory.SavedTensorBytes(exclude=(data,)) as saved:
        y = x * data  # saves data (excluded) and x
        z = (y * x).sum()  # saves y and x again (x counted once)
    assert saved.total == 8000 * 2 and saved.live == 8000 * 2 == saved.peak
    z.backward()
    del y, z
    assert saved.collect() == 0 and saved.peak == 16000 and saved.total == 16000
    torch.testing.assert_close(x.grad, 2 * x.detach() * data)


def test_double_backward_inside_the_meter():
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    with il.memory.SavedTensorBytes() as saved:
        (g,) = torch.autograd.grad(torch.sin(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, -torch.sin(x.detach()))
    assert saved.total > 0
    gc.collect()
