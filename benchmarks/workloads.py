"""Parameter shapes of the benchmark workloads (DESIGN.md §5), written out by hand so that no model
library or download is needed. Shapes follow the reference models' parameter lists
(``named_parameters()`` order): Hugging Face GPT-2 small, torchvision ResNet-50 and ViT-B/16.

Usage: ``WORKLOADS[name]()`` returns the list of shapes; :func:`make_params` turns them into
tensors with random gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

Shape = tuple[int, ...]

__all__ = ["WORKLOADS", "Shape", "gpt2_small", "make_params", "numel", "resnet50", "small_tensors", "vit_b16"]


def gpt2_small() -> list[Shape]:
    """GPT-2 small (124M parameters, 148 tensors). Conv1D weights are stored (in, out)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def resnet50() -> list[Shape]:
    """ResNet-50 (25.6M parameters, 161 tensors): bottleneck blocks [3, 4, 6, 3]."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1

    def conv_bn(cout: int, cin: int, k: int) -> list[Shape]:
        return [(cout, cin, k, k), (cout,), (cout,)]

    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += conv_bn(width, cin, 1) + conv_bn(width, width, 3) + conv_bn(4 * width, width, 1)
            if b == 0:  # downsample branch
                shapes += conv_bn(4 * width, cin, 1)
            cin = 4 * width
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def vit_b16() -> list[Shape]:
    """ViT-B/16 at 224x224 (86.6M parameters, 152 tensors)."""
    d, mlp, layers, tokens = 768, 3072, 12, 197
    shapes: list[Shape] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, tokens, d)]  # cls, patch conv, pos
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (3 * d, d), (3 * d,),  # attention in_proj
            (d, d), (d,),  # attention out_proj
            (d,), (d,),  # ln_2
            (mlp, d), (mlp,),  # mlp linear_1
            (d, mlp), (d,),  # mlp linear_2
        ]
    shapes += [(d,), (d,), (1000, d), (1000,)]  # final ln, head
    return shapes


def small_tensors(count: int = 4000, seed: int = 0) -> list[Shape]:
    """``count`` small tensors of varied sizes (log-uniform, 8 to 16384 elements; 8.6M in all
    for 4000), a mix of vectors and matrices, the same for every run."""
    rng = random.Random(seed)
    shapes: list[Shape] = []
    for _ in range(count):
        n = round(math.exp(rng.uniform(math.log(8), math.log(16384))))
        rows = rng.choice((1, 2, 4, 8, 16))
        shapes.append((n,) if n % rows else (rows, n // rows))
    return shapes


WORKLOADS: dict[str, Callable[[], list[Shape]]] = {
    "gpt2-small": gpt2_small,
    "resnet50": resnet50,
    "vit-b16": vit_b16,
    "4000-small": small_tensors,
}


def numel(shapes: list[Shape]) -> int:
    """Total elements of a shape list."""
    return sum(math.prod(s) for s in shapes)


def make_params(shapes: list[Shape], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Leaf tensors of the given shapes with random values and random ``.grad`` (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(dtype).requires_grad_()
        p.grad = torch.randn(s, generator=gen).to(dtype)
        params.append(p)
    return params
