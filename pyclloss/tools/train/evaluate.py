"""How good an encoder's features are: kNN and linear-probe accuracy on a
labelled test split, with the training split as the memory / probe training set."""

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@torch.no_grad()
def features(encoder: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(images[i:i + batch_size]).float()
                     for i in range(0, images.shape[0], batch_size)])
    encoder.train(was_training)
    return out


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 k: int = 20, temperature: float = 0.1) -> float:
    """Cosine-similarity kNN, each neighbour's vote weighted by exp(sim / temperature)
    (the monitor of Wu et al. 2018 used by most self-supervised code)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    sim, idx = (test_x @ train_x.T).topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(test_x.shape[0], int(train_y.max()) + 1, device=test_x.device)
    votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                          weight_decay: float = 1e-3, iterations: int = 100) -> float:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS,
    deterministic), accuracy on the test split."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(train_y.max()) + 1
    probe = nn.Linear(train_x.shape[1], n_classes, device=train_x.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (probe(test_x).argmax(1) == test_y).float().mean().item()


def evaluate(encoder: nn.Module, train_images: Tensor, train_labels: Tensor,
             test_images: Tensor, test_labels: Tensor) -> dict:
    train_x, test_x = features(encoder, train_images), features(encoder, test_images)
    return {"knn_accuracy": knn_accuracy(train_x, train_labels, test_x, test_labels),
            "linear_probe_accuracy": linear_probe_accuracy(train_x, train_labels, test_x,
                                                           test_labels)}
