"""ViT on scikit-learn's bundled 8x8 digits: image patches as tokens, two topologies.

Each 8x8 image is cut into ``(8 / patch)^2`` patches in raster order, preceded by a ``[CLS]``
token. Topologies:

- ``"full"``: every token attends to every token of its image (ViT);
- ``"grid"``: each patch attends to its 3x3 neighbourhood on the patch grid (PyG's
  :func:`torch_geometric.utils.grid`, self-loops included), and ``[CLS]`` is a global token
  (attends to and is attended by every patch), as in local-attention vision transformers.

Needs scikit-learn (``pip install scikit-learn``) for the data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.utils import grid

from ..topology import full

VISION_TOPOLOGIES = ("grid", "full")
IMAGE_SIDE = 8  # the digits are 8x8 pixels
PATCH_SIZES = tuple(p for p in range(1, IMAGE_SIDE + 1) if IMAGE_SIDE % p == 0)  # 1, 2, 4, 8


def check_patch(patch: int) -> None:
    """A ``ValueError`` unless ``patch`` cuts the 8x8 digits into whole patches."""
    if patch not in PATCH_SIZES:
        raise ValueError(
            f"Expected 'patch' to divide the {IMAGE_SIDE}x{IMAGE_SIDE} digits, one of {PATCH_SIZES} (got {patch})"
        )


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """Images ``[1797, 8, 8]`` scaled to [0, 1] and labels ``[1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("The digits task needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, H, W]`` -> ``[B, (H/p)(W/p), p*p]`` in raster order."""
    b, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"Expected 'patch' to divide the image size {h}x{w} (got {patch})")
    x = images.reshape(b, h // patch, patch, w // patch, patch)  # [B, h', p, w', p]
    return x.permute(0, 1, 3, 2, 4).reshape(b, (h // patch) * (w // patch), patch * patch)


def image_graph(side: int, topology: str) -> Tensor:
    """Token graph of one image: node 0 is ``[CLS]``, nodes ``1 .. side^2`` the patches."""
    p = side * side
    if topology == "full":
        return full(p + 1).as_tensor()
    if topology != "grid":
        raise ValueError(f"Expected a vision topology in {VISION_TOPOLOGIES} (got {topology!r})")
    patch_edges, _ = grid(side, side)  # [2, E], 3x3 neighbourhoods with self-loops
    patches = torch.arange(1, p + 1)
    cls_in = torch.stack([patches, torch.zeros_like(patches)])  # patch -> CLS
    cls_out = torch.stack([torch.zeros(p + 1, dtype=torch.long), torch.arange(p + 1)])  # CLS -> all
    edge_index = torch.cat([patch_edges + 1, cls_in, cls_out], dim=1)
    order = (edge_index[1] * (p + 1) + edge_index[0]).argsort()  # sorted by target
    return edge_index[:, order]


def batch_graph(graph: Tensor, nodes_per_image: int, batch_size: int) -> Tensor:
    """The disjoint union of ``batch_size`` copies of one image graph."""
    offsets = torch.arange(batch_size).repeat_interleave(graph.size(1)) * nodes_per_image  # [B*E]
    return graph.repeat(1, batch_size) + offsets


@dataclass
class ImageBatch:
    patches: Tensor  # [B, P, patch*patch]
    labels: Tensor  # [B]


class DigitsWorkload:
    """Digit classification (1797 images: 1437 train / 360 test, split by a fixed seed)."""

    def __init__(self, topology: str = "grid", patch: int = 2, batch_size: int = 64, seed: int = 0) -> None:
        check_patch(patch)
        images, labels = load_digits_tensors()
        self.topology, self.patch, self.batch_size = topology, patch, batch_size
        self.side = IMAGE_SIDE // patch
        self.num_patches, self.patch_dim, self.num_classes = self.side**2, patch * patch, 10
        self.graph = image_graph(self.side, topology)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        test, train = perm[:360], perm[360:]
        x = patchify(images, patch)
        self.train_x, self.train_y = x[train], labels[train]
        self._test = [ImageBatch(x[test[i : i + 128]], labels[test[i : i + 128]]) for i in range(0, len(test), 128)]

    def train_batch(self, generator: torch.Generator) -> ImageBatch:
        idx = torch.randint(0, len(self.train_y), (self.batch_size,), generator=generator)
        return ImageBatch(self.train_x[idx], self.train_y[idx])

    def logits(self, model, batch: ImageBatch, device) -> tuple[Tensor, Tensor]:
        b = batch.patches.size(0)
        edge_index = batch_graph(self.graph, self.num_patches + 1, b).to(device)
        return model(batch.patches.to(device), edge_index), batch.labels.to(device)

    def eval_sets(self) -> dict[str, list[ImageBatch]]:
        return {"test": self._test}

    def batch_tokens(self, batch: ImageBatch) -> int:
        return batch.patches.size(0) * (self.num_patches + 1)
