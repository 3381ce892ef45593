"""Data for the reference trainer: images as one float tensor in [0, 1], a fixed
train/test split, a data order and augmentations drawn from (seed, epoch)."""

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Dataset:
    """Images (N, C, H, W) in [0, 1] and optional int64 labels (N)."""

    images: Tensor
    labels: Optional[Tensor]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> "Dataset":
        labels = self.labels[index] if self.labels is not None else None
        return Dataset(self.images[index], labels, self.source)

    def to(self, device) -> "Dataset":
        labels = self.labels.to(device) if self.labels is not None else None
        return Dataset(self.images.to(device), labels, self.source)


def load_digits() -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 images of 8×8, 10 classes."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise RuntimeError("the default data set needs scikit-learn (pip install scikit-learn); "
                           "or pass --data PATH") from None
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Dataset(images, torch.tensor(digits.target, dtype=torch.int64), "sklearn digits")


def read_torch_file(flag: str, path: str):
    """What ``torch.load`` (weights only) reads from ``path``; a file it cannot
    read (garbage, empty, or holding other objects) is a ValueError naming ``flag``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty or truncated"
        raise ValueError(f"{flag} {path}: not a file torch.load can read "
                         f"({type(exc).__name__}: {reason})") from None


def _as_float_images(images, path: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise ValueError(f"--data {path}: images must be a tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"--data {path}: images must be (N, C, H, W) or (N, H, W) with N >= 1, "
                         f"got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"--data {path}: images must be uint8 or floating point, got "
                         f"{images.dtype}")
    images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"--data {path}: images contain NaN or Inf")
    return images


def _as_class_indices(labels, n: int, path: str) -> Tensor:
    """Labels (n,) as int64 class indices in [0, n): the trainer sizes its class
    tables (kNN votes, linear probe, Hydra's class embeddings) by the largest."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"--data {path}: labels must be a tensor or a list of integers") from None
    if (labels.dtype == torch.bool or labels.dtype.is_complex
            or labels.dtype.is_floating_point and not bool((labels == labels.round()).all())):
        raise ValueError(f"--data {path}: labels must be integers (class indices)")
    if labels.numel() != n:
        raise ValueError(f"--data {path}: {labels.numel()} labels for {n} images")
    labels = labels.reshape(-1)
    if bool(((labels < 0) | (labels >= n)).any()):
        raise ValueError(f"--data {path}: labels must be class indices in [0, {n}) (at most one "
                         f"class per image), got {labels.min().item()}..{labels.max().item()}; "
                         f"number the classes 0, 1, ...")
    return labels.long()


def load_tensor_file(path: str) -> Dataset:
    """A .pt file holding a tensor of images, an (images, labels) pair, or a dict
    with "images" and optionally "labels"."""
    obj = read_torch_file("--data", path)
    if isinstance(obj, dict):
        if "images" not in obj:
            raise ValueError(f"--data {path}: a dict must have an 'images' entry (and may have "
                             f"'labels')")
        images, labels = obj["images"], obj.get("labels")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        images, labels = obj
    elif isinstance(obj, Tensor):
        images, labels = obj, None
    else:
        raise ValueError(f"--data {path}: expected a tensor, (images, labels) or a dict, got "
                         f"{type(obj).__name__}")
    images = _as_float_images(images, path)
    if labels is not None:
        labels = _as_class_indices(labels, images.shape[0], path)
    return Dataset(images, labels, path)


def load_image_folder(root: str, image_size: int) -> Dataset:
    """An ImageFolder layout: root/<class name>/<image>; classes in sorted order,
    images resized to image_size × image_size RGB."""
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError(f"reading the image folder {root} needs Pillow (pip install pillow); "
                           "or save the images as a .pt tensor file") from None
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file_name in sorted(os.listdir(os.path.join(root, name))):
            if file_name.lower().endswith(IMAGE_SUFFIXES):
                with Image.open(os.path.join(root, name, file_name)) as image:
                    image = image.convert("RGB").resize((image_size, image_size))
                    images.append(torch.from_numpy(np.asarray(image).copy()))
                labels.append(label)
    if not images:
        raise ValueError(f"{root}: no images found in class folders (root/<class>/<image>)")
    stacked = torch.stack(images).permute(0, 3, 1, 2).contiguous()
    return Dataset(stacked.float() / 255.0, torch.tensor(labels), root)


def load_dataset(path: Optional[str], image_size: int) -> Dataset:
    if path is None:
        return load_digits()
    if os.path.isdir(path):
        return load_image_folder(path, image_size)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    return load_tensor_file(path)


def train_test_split(data: Dataset, test_fraction: float = 0.25):
    """A fixed split (the same for every seed, so runs compare on the same data)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(data) * test_fraction))
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def epoch_generator(seed: int, epoch: int, device) -> torch.Generator:
    """The random stream of one epoch (data order and augmentations): a function
    of (seed, epoch) alone, so a resumed run draws what an uninterrupted one does."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(mixed)


def augment(images: Tensor, generator: torch.Generator, min_crop: float = 0.7,
            max_shift: float = 0.15, max_rotation: float = 0.25, noise: float = 0.1) -> Tensor:
    """A random view: a square window of side min_crop..1 of the image, shifted by up
    to max_shift of its side and rotated by up to max_rotation radians, resized back
    to full size; then Gaussian noise."""
    n, device = images.shape[0], images.device

    def uniform(bound_low, bound_high, *shape):
        return bound_low + (bound_high - bound_low) * torch.rand(n, *shape, generator=generator,
                                                                 device=device)

    # affine_grid maps output coordinates in [-1, 1] to input coordinates: a scale
    # below 1 reads a smaller window (a crop), the offset moves it (a shift).
    scale = uniform(min_crop, 1.0)
    angle = uniform(-max_rotation, max_rotation)
    shift_x, shift_y = uniform(-2 * max_shift, 2 * max_shift, 2).unbind(1)
    cos, sin = scale * angle.cos(), scale * angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1),
                         torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    return views + noise * torch.randn(views.shape, generator=generator, device=device)
