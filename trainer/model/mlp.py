"""SwiGLU feed-forward sublayer (Shazeer 2020, "GLU Variants Improve Transformer")."""
from torch import nn

from longtrain.kernels.swiglu import swiglu


class SwiGLU(nn.Module):
    """x: (batch, seq, d_model) -> (batch, seq, d_model); the hidden width is split over tp shards."""

    def __init__(self, d_model: int, d_hidden: int, linears):
        super().__init__()
        self.gate = linears.column(d_model, d_hidden)
        self.up = linears.column(d_model, d_hidden)
        self.down = linears.row(d_hidden, d_model)

    def forward(self, x):
        return self.down(swiglu(self.gate(x), self.up(x)))
