import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, PaperConfig, build_denoiser


def cond_for(shape, B=3):
    enc = CondEncoder(shape[1], shape[0], 10, CondConfig(dim=32, hidden=16), weight_shape=shape)
    return enc(torch.randn(B, shape[1]), torch.randn(B, shape[0]), torch.randn(B, 10))


@pytest.mark.parametrize(
    "cfg",
    [CompactConfig(), PaperConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), pad=16)],
)
def test_denoiser_interface_and_training_step(cfg):
    shape = (8, 12)
    den = build_denoiser(cfg, shape, 32)
    cond = cond_for(shape)
    x = torch.randn(3, *shape)
    t = torch.tensor([0, 500, 999])
    den.eval()
    with torch.no_grad():  # each row depends on its own x, t and conditioning only, and on each of them
        whole = den(x, t, cond)
        row = type(cond)(*(c[1:2] for c in cond))  # (Cond: emb, rows, cols, each (B, ...))
        assert torch.allclose(den(x[1:2], t[1:2], row), whole[1:2], atol=1e-5)
        assert not torch.allclose(den(x, t.flip(0), cond), whole, atol=1e-4)
        assert not torch.allclose(den(x.flip(0), t, cond), whole, atol=1e-4)
    den.train()
    eps = den(x, t, cond)
    assert eps.shape == (3, 8, 12)
    loss = (eps - torch.randn_like(eps)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in den.parameters() if p.requires_grad)


def test_paper_unet_refuses_a_delta_larger_than_its_canvas():
    with pytest.raises(ValueError, match=r"^delta \(20, 12\) \(as a 20x12 matrix\) does not fit into the 16x16 padded"):
        build_denoiser(
            PaperConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), pad=16), (20, 12), 32
        )(torch.randn(1, 20, 12), torch.tensor([3]), cond_for((20, 12), 1))


def test_compact_denoiser_costs_about_a_lenet_forward():
    den = build_denoiser(CompactConfig(), (84, 120), 128)
    enc = CondEncoder(120, 84, 10, CondConfig(), weight_shape=(84, 120))
    cond = enc(torch.randn(1, 120), torch.randn(1, 84), torch.randn(1, 10))
    with FlopCounterMode(display=False) as fc:
        den(torch.randn(1, 84, 120), torch.tensor([10]), cond)
    assert fc.get_total_flops() < 3e6  # vs 124 GFLOP for the paper UNet at 128x128
    assert sum(p.numel() for p in den.parameters()) < 200_000


def test_cond_axis_features_for_conv_weights():
    enc = CondEncoder(6 * 14 * 14, 16 * 10 * 10, 10, CondConfig(dim=8, hidden=8), weight_shape=(16, 6, 5, 5))
    c = enc(torch.randn(2, 6 * 14 * 14), torch.randn(2, 1600), torch.randn(2, 10))
    assert c.emb.shape == (2, 8) and c.rows.shape == (2, 16, 3) and c.cols.shape == (2, 150, 2)
    assert torch.equal(c.rows[..., 2], torch.zeros(2, 16))  # no output-grad feature unless configured
    assert torch.equal(c.cols[:, 0], c.cols[:, 24])  # 25 kernel taps of input channel 0 share its features
