"""Networks that produce the scale s and translation t of a coupling layer from its conditioning input.

Each maps the conditioning part (B, C_in, ...) to (B, 2 * C_out, ...), split into s and t along dim 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def wn_conv2d(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Module:
    """Weight-normalised 'same' convolution (gain ``parametrizations.weight.original0``)."""
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias))


class ResidualBlock(nn.Module):
    """BN-ReLU-WNconv3x3 twice, plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_norm = nn.BatchNorm2d(channels)
        self.in_conv = wn_conv2d(channels, channels, 3, bias=False)
        self.out_norm = nn.BatchNorm2d(channels)
        self.out_conv = wn_conv2d(channels, channels, 3, bias=True)

    def forward(self, x):
        h = self.in_conv(F.relu(self.in_norm(x)))
        return x + self.out_conv(F.relu(self.out_norm(h)))


class ResNetST(nn.Module):
    """RealNVP's s/t ResNet: BN of the input (x2 after it for checkerboard couplings), concat [x, -x], ReLU,
    WNconv3x3 to ``mid_channels``, ``num_blocks`` residual blocks with 1x1 skip convs summed, BN-ReLU-WNconv1x1 to
    ``out_channels``. (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, num_blocks: int,
                 double_after_norm: bool = False):
        super().__init__()
        if num_blocks < 0 or mid_channels < 1:
            raise ValueError(f"ResNetST needs mid_channels >= 1 and num_blocks >= 0, got {mid_channels}, {num_blocks}")
        self.double_after_norm = double_after_norm
        self.in_norm = nn.BatchNorm2d(in_channels)
        self.in_conv = wn_conv2d(2 * in_channels, mid_channels, 3)
        self.in_skip = wn_conv2d(mid_channels, mid_channels, 1)
        self.blocks = nn.ModuleList([ResidualBlock(mid_channels) for _ in range(num_blocks)])
        self.skips = nn.ModuleList([wn_conv2d(mid_channels, mid_channels, 1) for _ in range(num_blocks)])
        self.out_norm = nn.BatchNorm2d(mid_channels)
        self.out_conv = wn_conv2d(mid_channels, out_channels, 1)

    def forward(self, x):
        x = self.in_norm(x)
        if self.double_after_norm:
            x = 2 * x
        x = self.in_conv(F.relu(torch.cat((x, -x), dim=1)))
        skip = self.in_skip(x)
        for block, skip_conv in zip(self.blocks, self.skips):
            x = block(x)
            skip = skip + skip_conv(x)
        return self.out_conv(F.relu(self.out_norm(skip)))


class MLPST(nn.Module):
    """Tabular s/t net: Linear(in, k) - ReLU - Dropout - [Linear(k, k) - ReLU] x num_layers - Linear(k, out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 1, dropout: float = 0.5):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        for _ in range(num_layers):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(hidden_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
