"""Build the model: torchvision names or package.module:Class, the small-input stem, the collapse check.

The small-input stem is what CIFAR-style ResNets use: the first convolution becomes 3x3 with
stride 1 and the max-pool right after it goes away, so a 32 px image keeps its resolution
into the first stage instead of shrinking 4x in the stem. It is applied generically (first
Conv2d of the network, first MaxPool2d before the second Conv2d), which covers ResNets,
AlexNet, VGG, MobileNet, EfficientNet and ConvNeXt alike. Parameter names stay those of the
torchvision model, so weights of a standard-stem model load into the plain torchvision class.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn


class CollapseError(ValueError):
    """The model's feature maps vanish at this image size; the message names the layer."""


def uses_small_stem(stem: str, image_size: int) -> bool:
    return stem == "small" or (stem == "auto" and image_size <= 64)


def build_model(
    arch: str, num_classes: int, *, stem: str = "auto", image_size: int = 224, zero_init_residual: bool = True
) -> nn.Module:
    if ":" in arch:
        module, _, cls = arch.partition(":")
        model = getattr(importlib.import_module(module), cls)(num_classes=num_classes)
    else:
        import torchvision.models

        kwargs = {"num_classes": num_classes, "weights": None}
        if arch.startswith(("resnet", "resnext", "wide_resnet")):
            kwargs["zero_init_residual"] = zero_init_residual
        model = torchvision.models.get_model(arch, **kwargs)
    if uses_small_stem(stem, image_size):
        small_input_stem(model)
    return model


def small_input_stem(model: nn.Module) -> None:
    """Turn the first conv into 3x3 stride 1 and drop the stem's max-pool, in place."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("--stem small: the model has no Conv2d to adapt")
    name, first = convs[0]
    if first.kernel_size[0] > 3:
        new = nn.Conv2d(first.in_channels, first.out_channels, 3, 1, 1, bias=first.bias is not None)
        _set(model, name, new)
    else:
        first.stride = (1, 1)
    second = convs[1][0] if len(convs) > 1 else None
    for n, m in model.named_modules():
        if n == second:
            break
        if isinstance(m, nn.MaxPool2d):
            _set(model, n, nn.Identity())
            break


def _set(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_collapse(model: nn.Module, image_size: int, arch: str = "") -> None:
    """One dry forward pass at image_size; fail naming the layer where the feature map vanishes.

    A layer that raises (a pooling window larger than its input) or outputs a 0-sized map is
    reported. AlexNet's stem on 32 px images is the classic case.
    """
    entered: list[str] = []
    empty: list[tuple[str, tuple]] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod: nn.Module, _inp: tuple) -> None:
        entered.append(names.get(mod, "?"))

    def post(mod: nn.Module, inp: tuple, out: object) -> None:
        if (
            isinstance(out, torch.Tensor)
            and out.dim() == 4
            and (out.shape[-1] == 0 or out.shape[-2] == 0)
            and not empty
        ):
            shape = tuple(inp[0].shape[-2:]) if inp and isinstance(inp[0], torch.Tensor) else ()
            empty.append((names.get(mod, "?"), shape))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_pre_hook(pre) for m in leaves] + [m.register_forward_hook(post) for m in leaves]
    was_training = model.training
    model.eval()
    hint = "; use --stem small (3x3 stride-1 stem, no max-pool) or a larger --image-size"
    what = f"model {arch or type(model).__name__} at {image_size} px"
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as e:
        layer = entered[-1] if entered else "?"
        kind = type(model.get_submodule(layer)).__name__ if layer not in ("?", "") else ""
        detail = str(e).strip().splitlines()[0][:160]
        raise CollapseError(f"{what}: feature map collapses at layer {layer} ({kind}): {detail}{hint}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if empty:
        layer, shape = empty[0]
        kind = type(model.get_submodule(layer)).__name__
        raise CollapseError(f"{what}: layer {layer} ({kind}) turns a {shape} map into an empty one{hint}")


def nondeterministic_on_cuda(model: nn.Module) -> list[str]:
    """Layers whose CUDA backward has no deterministic kernel: adaptive pools to more than 1x1.

    An adaptive pool to 1x1 (ResNet, ConvNeXt, EfficientNet...) is computed as a mean, which
    is deterministic; VGG's (7x7) and AlexNet's (6x6) run adaptive_avg_pool2d_backward_cuda,
    which torch.use_deterministic_algorithms(True) refuses at the first backward.
    """
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if isinstance(m, nn.AdaptiveMaxPool2d) or any(s != 1 for s in size):
                found.append(f"{name} ({type(m).__name__} to {'x'.join(str(s) for s in size)})")
    return found


def check_deterministic(model: nn.Module, device_type: str, arch: str = "") -> None:
    """--deterministic on CUDA: fail before training, naming the layer, rather than at the first backward."""
    layers = nondeterministic_on_cuda(model) if device_type == "cuda" else []
    if layers:
        raise ValueError(
            f"--deterministic on CUDA: {arch or type(model).__name__} has no deterministic backward for "
            f"{', '.join(layers)}; drop --deterministic, or train on CPU, or use a model that pools to 1x1 (resnet...)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
