"""A small CNN encoder, a projection head, and the module that turns two views
into a contrastive loss."""

import copy
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor


class Encoder(nn.Module):
    """Three 3×3 conv blocks (the last two halve the resolution), global average
    pooling: any image size in, ``4 * width`` features out. Inputs are
    standardised with the training set's per-channel mean and std."""

    def __init__(self, in_channels: int, width: int, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.layers = nn.Sequential(*block(in_channels, width, 1), *block(width, 2 * width, 2),
                                    *block(2 * width, 4 * width, 2),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 4 * width

    def forward(self, images: Tensor) -> Tensor:
        return self.layers((images - self.mean) / self.std)


def projection_head(in_features: int, out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features),
                         nn.ReLU(inplace=True), nn.Linear(in_features, out_features))


class ContrastiveLearner(nn.Module):
    """Encoder + projection head + loss. With a momentum encoder (MoCo) the second
    view goes through an exponential moving average of the model, without gradient."""

    def __init__(self, encoder: Encoder, embedding_dim: int, loss: nn.Module,
                 momentum: Optional[float] = None):
        super().__init__()
        self.encoder = encoder
        self.head = projection_head(encoder.out_features, embedding_dim)
        self.loss = loss
        self.momentum = momentum
        if momentum is not None:
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)

    def embed(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))

    def forward(self, view1: Tensor, view2: Tensor, labels: Optional[Tensor],
                amp_dtype: Optional[torch.dtype], indices: Optional[Tensor] = None) -> Tensor:
        """The loss of a batch; ``indices`` (its data-set indices) go to a loss
        that tracks samples (DBPM) and only then."""
        device_type = view1.device.type
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z1 = self.embed(view1)
            if self.momentum is None:
                z2 = self.embed(view2)
            else:
                with torch.no_grad():
                    z2 = self.key_head(self.key_encoder(view2))
        # The loss runs outside autocast: it takes fp16/bf16 embeddings and
        # accumulates in fp32 itself.
        if indices is not None:
            return self.loss(z1, z2, labels, indices)
        return self.loss(z1, z2, labels)

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        if self.momentum is None:
            return
        for online, key in ((self.encoder, self.key_encoder), (self.head, self.key_head)):
            for p, k in zip(online.parameters(), key.parameters()):
                k.lerp_(p, 1.0 - self.momentum)
