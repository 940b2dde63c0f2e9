"""The paper's denoiser: a DDPM-style UNet over the weight delta, zero-padded to a square image.

Ported from the OCD authors' code, github.com/ShaharLutatiPersonal/OCD, file ``diffusion_ocd.py``
(class ``Model`` and its helpers ``get_timestep_embedding``, ``ResnetBlock``, ``AttnBlock``,
``Downsample``, ``Upsample``), with its MNIST configuration ``configs/train_mnist.json``
(``nch`` 128, ``ch_mult`` [1, 1, 2, 2, 4, 4], 2 ResBlocks per level, attention at 16x16 and in the
middle, resolution 128, one input and one output channel). That ``Model`` is itself the PyTorch DDPM
UNet of ermongroup/ddim (``models/diffusion.py``), a port of Ho et al.'s TensorFlow DDPM UNet.

Kept as in the original:
  * sinusoidal timestep embedding of width ``channels`` (sin half then cos half, log(10000)/(half-1)),
    then Linear(ch, 4ch) -> swish -> Linear(4ch, 4ch); the conditioning code is added after the second
    Linear, and the sum feeds every ResBlock through swish -> Linear(4ch, out_ch) (added after conv1);
  * GroupNorm(32 groups, eps 1e-6), swish, ResBlock = norm-swish-conv3x3, +temb, norm-swish-dropout-
    conv3x3, 1x1 "nin" shortcut when the width changes;
  * single-head self-attention with 1x1 q/k/v/proj convolutions, scale c^-1/2, at the resolutions in
    ``attn_resolutions`` (after every ResBlock of that level, down and up path) and in the middle;
  * stride-2 3x3 conv downsampling with asymmetric (0, 1, 0, 1) zero padding; nearest x2 upsampling
    followed by a 3x3 conv; ``num_res_blocks + 1`` ResBlocks per up level, each eating one skip;
  * PyTorch default initialisation everywhere (the original does not zero-initialise ``conv_out``).

Deviations (all deliberate):
  * default ``channel_mult`` is the original MNIST config's (1, 1, 2, 2, 4, 4), not the CIFAR-10 DDPM
    default (1, 2, 2, 2): at 128x128 only the former gives the paper's ~110 M parameters
    (1, 2, 2, 2 gives ~36 M). Pass ``channel_mult=(1, 2, 2, 2)`` explicitly for the smaller net.
  * conditioning: the original embeds input / activation / output of the layer with three
    Linear+SiLU heads, sums them and applies one Linear (``codeout``). Here the caller hands in the
    sum E_i + E_a + E_o (``cond``), and ``cond_proj`` = Linear(cond_dim, 4ch) plays ``codeout``.
  * padding: the original centres the delta in the 128x128 image; here it sits in the top-left corner
    (a fully convolutional net barely cares; crop is the mirror image). The original silently
    mis-handles weights larger than 128; here a too-large delta raises ValueError.
  * the padding/cropping lives inside ``forward`` (the original does it in the training loop), and a
    weight of more than two dimensions (conv: out, in, kh, kw) is flattened to (out, in*kh*kw).
  * ``dropout`` defaults to 0.0 (the original MNIST config uses 0.4).
  * GroupNorm uses gcd(32, C) groups, which is 32 for every width of the default config; this only
    matters for toy widths that are not multiples of 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PaperUNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """DDPM sinusoidal embedding of (B,) timesteps -> (B, dim): [sin(t w_k), cos(t w_k)]."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1))
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6, affine=True)


def _conv3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm-swish-conv, + projected (swish'd) time/cond embedding, norm-swish-dropout-conv, residual."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv3(c_in, c_out)
        self.temb_proj = nn.Linear(temb_ch, c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, hh * ww).transpose(1, 2)  # (b, hw, c)
        k = self.k(n).reshape(b, c, hh * ww)  # (b, c, hw)
        v = self.v(n).reshape(b, c, hh * ww)  # (b, c, hw)
        # explicit bmm (as the original) so FlopCounterMode sees every multiply
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 stride-2 conv after (right, bottom) zero padding: H -> H/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResBlocks, optional attention after each, optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample: nn.Module | None = None


class PaperUNet(nn.Module):
    """Paper denoiser: UNet on the weight delta zero-padded to `pad` x `pad`."""

    def __init__(
        self,
        delta_shape: tuple[int, ...],
        cond_dim: int,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        pad: int = 128,
    ) -> None:
        super().__init__()
        delta_shape = tuple(int(s) for s in delta_shape)
        if len(delta_shape) < 2:
            raise ValueError(f"PaperUNet needs a weight of >= 2 dims (out, in, ...), got {delta_shape}")
        rows, cols = delta_shape[0], math.prod(delta_shape[1:])
        if rows > pad or cols > pad:
            raise ValueError(
                f"delta {delta_shape} (as a {rows}x{cols} matrix) does not fit into the {pad}x{pad} "
                f"padded image; raise `pad` or use a compact denoiser"
            )
        n_levels = len(channel_mult)
        if n_levels < 1:
            raise ValueError("channel_mult must have at least one entry")
        if pad % (2 ** (n_levels - 1)):
            raise ValueError(f"pad={pad} must be divisible by 2**(len(channel_mult)-1)={2 ** (n_levels - 1)}")

        self.delta_shape = delta_shape
        self.matrix_shape = (rows, cols)
        self.cond_dim = int(cond_dim)
        self.ch = channels
        self.temb_ch = 4 * channels
        self.pad = pad
        self.num_res_blocks = num_res_blocks
        self.channel_mult = tuple(channel_mult)
        self.attn_resolutions = tuple(attn_resolutions)

        # time embedding MLP and conditioning projection (the original's `codeout`)
        self.temb_dense0 = nn.Linear(channels, self.temb_ch)
        self.temb_dense1 = nn.Linear(self.temb_ch, self.temb_ch)
        self.cond_proj = nn.Linear(cond_dim, self.temb_ch)

        self.conv_in = _conv3(1, channels)

        # down path; remember the width of every tensor pushed on the skip stack
        res = pad
        width = channels
        skip_widths = [width]
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, channels * mult, self.temb_ch, dropout))
                width = channels * mult
                if res in self.attn_resolutions:
                    level.attn.append(AttnBlock(width))
                skip_widths.append(width)
            if i != n_levels - 1:
                level.resample = Downsample(width)
                res //= 2
                skip_widths.append(width)
            self.down.append(level)

        # middle
        self.mid_block_1 = ResnetBlock(width, width, self.temb_ch, dropout)
        self.mid_attn_1 = AttnBlock(width)
        self.mid_block_2 = ResnetBlock(width, width, self.temb_ch, dropout)

        # up path (stored in resolution order, i.e. up[0] is the full-resolution level)
        up_levels: list[_Level] = []
        for i in reversed(range(n_levels)):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                out_w = channels * channel_mult[i]
                level.block.append(ResnetBlock(width + skip_widths.pop(), out_w, self.temb_ch, dropout))
                width = out_w
                if res in self.attn_resolutions:
                    level.attn.append(AttnBlock(width))
            if i != 0:
                level.resample = Upsample(width)
                res *= 2
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)
        assert not skip_widths

        self.norm_out = _norm(width)
        self.conv_out = _conv3(width, 1)

    # ------------------------------------------------------------------ helpers
    def _embed(self, t: Tensor, cond: Tensor, batch: int) -> Tensor:
        if t.ndim == 0:
            t = t.expand(batch)
        temb = timestep_embedding(t, self.ch).to(cond.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        return temb + self.cond_proj(cond)

    def _unet(self, x: Tensor, temb: Tensor) -> Tensor:
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(hs[-1], temb)), temb)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    # ------------------------------------------------------------------ API
    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t: (B, *delta_shape) noisy unit-variance delta; t: (B,) integer timesteps in [0, 1000);
        cond: (B, cond_dim) conditioning embedding (already E_i+E_a+E_o, computed once per request).
        Returns eps prediction (B, *delta_shape)."""
        if tuple(x_t.shape[1:]) != self.delta_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected (B, *{self.delta_shape})")
        if cond.ndim != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond has shape {tuple(cond.shape)}, expected (B, {self.cond_dim})")
        b = x_t.shape[0]
        rows, cols = self.matrix_shape
        img = F.pad(x_t.reshape(b, 1, rows, cols), (0, self.pad - cols, 0, self.pad - rows))
        out = self._unet(img, self._embed(t, cond, b))
        return out[:, 0, :rows, :cols].reshape(b, *self.delta_shape)
