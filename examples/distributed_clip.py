"""CLIP training steps over torch.distributed with pyclloss's distributed loss.

    torchrun --nproc_per_node=2 examples/distributed_clip.py --strategy ring

NCCL on GPUs (one per process), gloo on the CPU. Two linear "towers" embed
random paired data; DDP averages their gradients, the loss sees the global
batch (every rank's pairs) as one, and every rank prints the same loss.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pyclloss


class Towers(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.image, self.text = nn.Linear(in_dim, dim), nn.Linear(in_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["all_gather", "ring"], default="ring")
    parser.add_argument("--batch", type=int, default=256, help="pairs per rank")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere
    model = DistributedDataParallel(Towers(64, 32).to(device))
    loss_fn = pyclloss.ClipLoss(gather_distributed=True, strategy=args.strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    torch.manual_seed(1 + rank)  # each rank its own data
    shared = torch.randn(args.batch, 64, device=device)
    images = shared + 0.3 * torch.randn_like(shared)
    texts = shared + 0.3 * torch.randn_like(shared)
    for step in range(args.steps):
        loss = loss_fn(*model(images, texts))
        optimizer.zero_grad()
        loss.backward()  # after DDP's averaging: the gradient of the global-batch loss
        optimizer.step()
        print(f"rank {rank} step {step}: loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
