"""face-api.js's age and gender network, as a small torch module that reads the package's weights.

The weights come from the npm package `@vladmandic/face-api` (MIT): `model/age_gender_model.bin`
(uint8-quantised float shards, 430 KB) described by `model/age_gender_model-weights_manifest.json`
(names, shapes, quantisation scale/min). Nothing of the package is copied into this repository:
`make setup` runs `npm pack @vladmandic/face-api` into the cache, and this module reads the two
files from that tarball (or from an unpacked package), dequantises them exactly as TFJS does
(`q * scale + min`) and caches them once as `age_gender.safetensors` in `cache_dir("models")`.

The architecture below is written from the manifest's names and shapes and the package's
TypeScript (TinyXception with 2 middle blocks + two fully connected heads):

    input: face crop (RGB 0-255) -> zero-pad to a square (centred) -> bilinear resize to 112
           (TF's legacy resize: no half-pixel centres) -> minus mean RGB (122.782, 117.001, 104.298) -> / 255
    entry_flow   conv_in 3x3 /2 (32) + ReLU
                 reduction_block_0 (64, input not activated), reduction_block_1 (128)
    middle_flow  main_block_0, main_block_1 (128; three ReLU + separable conv, residual)
    exit_flow    reduction_block (256), ReLU + separable conv (512) + ReLU
    head         7x7 average pool -> fc/age (512 -> 1, years), fc/gender (512 -> 2, softmax: male, female)

reduction block:  [ReLU] sepconv -> ReLU -> sepconv -> maxpool 3x3 /2 'same'  +  conv 1x1 /2 of the input
TF 'same' padding puts the odd pixel at the bottom/right; it is reproduced exactly (max pooling
pads with -inf). The test suite checks this module against the package's own TFJS network.

    net = load_age_gender_net()                       # ModelUnavailableError when npm/weights are missing
    net.predict([face_crop_uint8_hwc, ...])           # [AgeGender(age=34.2, p_male=0.12), ...]
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ModelUnavailableError
from ..paths import atomic_write, cache_dir, remove_dead_temps
from .cache import cached_model

log = logging.getLogger(__name__)

NPM_PACKAGE = "@vladmandic/face-api"
NPM_VERSION = "1.7.15"
MANIFEST = "age_gender_model-weights_manifest.json"
INPUT_SIZE = 112
MEAN_RGB = (122.782, 117.001, 104.298)
CACHE_NAME = "face-api-age-gender"
CONVERSION_FORMAT = 1
INSTALL_HINT = (f"the apparent age/gender model needs the npm package {NPM_PACKAGE} (MIT): run `make setup`, or "
                f"`npm pack {NPM_PACKAGE}@{NPM_VERSION} --pack-destination \"${{MEL_CACHE:-$HOME/.cache/mel}}/npm\"`, "
                f"or point MEL_FACE_API_DIR at an unpacked copy of the package")


# -----------------------------------------------------------------------------
# the network


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'same' padding (before, after) for one axis: the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[2], kernel, stride)
    left, right = _same_pad(x.shape[3], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class Conv(nn.Module):
    """tf.conv2d(x, filters, stride, 'same') + bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.filters = nn.Parameter(torch.zeros(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_pad_same(x, self.kernel, self.stride), self.filters, self.bias, stride=self.stride)


class SeparableConv(nn.Module):
    """tf.separableConv2d(x, depthwise 3x3, pointwise 1x1, stride 1, 'same') + bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise_filter = nn.Parameter(torch.zeros(cin, 1, 3, 3))
        self.pointwise_filter = nn.Parameter(torch.zeros(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(_pad_same(x, 3, 1), self.depthwise_filter, groups=x.shape[1])
        return F.conv2d(x, self.pointwise_filter, self.bias)


class ReductionBlock(nn.Module):
    def __init__(self, cin: int, cout: int, activate_input: bool = True):
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = SeparableConv(cin, cout)
        self.separable_conv1 = SeparableConv(cout, cout)
        self.expansion_conv = Conv(cin, cout, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) if self.activate_input else x
        out = self.separable_conv0(out)
        out = self.separable_conv1(F.relu(out))
        out = F.max_pool2d(_pad_same(out, 3, 2, value=float("-inf")), 3, 2)
        return out + self.expansion_conv(x)


class MainBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.separable_conv0 = SeparableConv(c, c)
        self.separable_conv1 = SeparableConv(c, c)
        self.separable_conv2 = SeparableConv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.separable_conv0(F.relu(x))
        out = self.separable_conv1(F.relu(out))
        out = self.separable_conv2(F.relu(out))
        return out + x


class AgeGenderNet(nn.Module):
    """TinyXception(2) + age and gender heads. Parameter names follow the TFJS manifest
    (`entry_flow/conv_in/filters` -> `entry_flow.conv_in.filters`)."""

    def __init__(self):
        super().__init__()
        self.entry_flow = nn.ModuleDict({
            "conv_in": Conv(3, 32, 3, 2),
            "reduction_block_0": ReductionBlock(32, 64, activate_input=False),
            "reduction_block_1": ReductionBlock(64, 128),
        })
        self.middle_flow = nn.ModuleDict({f"main_block_{i}": MainBlock(128) for i in range(2)})
        self.exit_flow = nn.ModuleDict({"reduction_block": ReductionBlock(128, 256),
                                        "separable_conv": SeparableConv(256, 512)})
        self.fc = nn.ModuleDict({"age": nn.Linear(512, 1), "gender": nn.Linear(512, 2)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, 3, 112, 112) preprocessed -> (age in years (n,), gender logits (n, 2): male, female)."""
        out = F.relu(self.entry_flow["conv_in"](x))
        out = self.entry_flow["reduction_block_0"](out)
        out = self.entry_flow["reduction_block_1"](out)
        for i in range(2):
            out = self.middle_flow[f"main_block_{i}"](out)
        out = self.exit_flow["reduction_block"](out)
        out = F.relu(self.exit_flow["separable_conv"](out))
        pooled = F.avg_pool2d(out, 7, 2).flatten(1)  # (n, 512) for a 112 input (7x7 maps)
        return self.fc["age"](pooled).squeeze(-1), self.fc["gender"](pooled)


# -----------------------------------------------------------------------------
# preprocessing: exactly face-api's tensor path (padToSquare centred + tf.image.resizeBilinear)


def _resize_bilinear_legacy(img: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resizeBilinear(img, [size, size], alignCorners=false, halfPixelCenters=false)."""
    h, w = img.shape[:2]

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size, dtype=np.float64) * (n_in / size)
        lo = np.maximum(np.floor(src).astype(np.int64), 0)
        hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    img = img.astype(np.float64)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx[None, :, None]
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx[None, :, None]
    return (top + (bottom - top) * fy[:, None, None]).astype(np.float32)


def _pad_to_square(img: np.ndarray) -> np.ndarray:
    """face-api's padToSquare(centred): zeros, round(diff / 2) after the image, the rest before."""
    h, w = img.shape[:2]
    if h == w:
        return img
    diff = abs(h - w)
    after = int(np.floor(diff * 0.5 + 0.5))  # JS Math.round
    before = diff - after
    pad = ((0, 0), (before, after), (0, 0)) if h > w else ((before, after), (0, 0), (0, 0))
    return np.pad(img, pad)


def preprocess(crops: list[np.ndarray]) -> torch.Tensor:
    """(n, 3, 112, 112) network input from RGB face crops (H, W, 3), values 0-255."""
    out = []
    for crop in crops:
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 1 or crop.shape[1] < 1:
            raise ValueError(f"a face crop must be an (H, W, 3) RGB array, got shape {crop.shape}")
        img = _pad_to_square(crop.astype(np.float32))
        if img.shape[0] != INPUT_SIZE:
            img = _resize_bilinear_legacy(img, INPUT_SIZE)
        img = (img - np.asarray(MEAN_RGB, np.float32)) / 255.0
        out.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)))
    return torch.stack(out)


@dataclass(frozen=True)
class AgeGender:
    age: float       # apparent age in years, as the network estimates it
    p_male: float    # softmax probability of its "male" output (1 - p_male: "female")

    @property
    def gender(self) -> str:
        return "male" if self.p_male > 0.5 else "female"

    @property
    def gender_probability(self) -> float:
        return self.p_male if self.p_male > 0.5 else 1.0 - self.p_male


class AgeGenderModel:
    """The network plus its preprocessing."""

    name = f"face-api age-gender ({NPM_PACKAGE})"

    def __init__(self, net: AgeGenderNet, device: str = "cpu", source: str = ""):
        self.net, self.device, self.source = net.eval().requires_grad_(False).to(device), device, source

    def predict(self, crops: list[np.ndarray]) -> list[AgeGender]:
        if not crops:
            return []
        with torch.inference_mode():
            age, logits = self.net(preprocess(crops).to(self.device))
            p = logits.float().softmax(-1)[:, 0].cpu()
        return [AgeGender(float(a), float(q)) for a, q in zip(age.float().cpu(), p, strict=True)]


# -----------------------------------------------------------------------------
# finding the package's weights, converting them once


def _candidate_sources() -> list[Path]:
    """Where the package may be: $MEL_FACE_API_DIR, `npm pack` tarballs in the cache, node_modules."""
    out: list[Path] = []
    env = os.environ.get("MEL_FACE_API_DIR")
    if env:
        out.append(Path(env).expanduser())
    root = Path(os.environ.get("MEL_CACHE") or Path.home() / ".cache" / "mel")
    npm_dir = root / "npm"
    if npm_dir.is_dir():
        out += sorted(npm_dir.glob("vladmandic-face-api-*.tgz"), reverse=True)
        out.append(npm_dir / "node_modules" / "@vladmandic" / "face-api")
    from ..paths import REPO_ROOT
    out.append(REPO_ROOT / "node_modules" / "@vladmandic" / "face-api")
    return out


def _read_from(source: Path) -> tuple[list[dict], bytes, str] | None:
    """(manifest weight specs, weight bytes, description) from a package dir/tarball, or None."""
    if source.is_file() and source.name.endswith((".tgz", ".tar.gz")):
        try:
            with tarfile.open(source, "r:gz") as tar:
                def member(name):
                    f = tar.extractfile(f"package/model/{name}")
                    return f.read() if f is not None else None
                manifest = json.loads(member(MANIFEST))
                paths = [p for group in manifest for p in group["paths"]]
                blob = b"".join(member(p) for p in paths)
        except (OSError, KeyError, ValueError, tarfile.TarError, TypeError) as e:
            log.warning("%s: cannot read the age/gender weights (%s)", source, e)
            return None
        return [w for group in manifest for w in group["weights"]], blob, source.name
    if source.is_dir():
        model_dir = source / "model" if (source / "model" / MANIFEST).is_file() else source
        if not (model_dir / MANIFEST).is_file():
            return None
        try:
            manifest = json.loads((model_dir / MANIFEST).read_text())
            blob = b"".join((model_dir / p).read_bytes() for group in manifest for p in group["paths"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: cannot read the age/gender weights (%s)", model_dir, e)
            return None
        return [w for group in manifest for w in group["weights"]], blob, str(model_dir)
    return None


def decode_weights(specs: list[dict], blob: bytes) -> dict[str, np.ndarray]:
    """TFJS `io.decodeWeights`: float32 tensors, uint8/uint16 ones dequantised as q * scale + min."""
    out, offset = {}, 0
    for spec in specs:
        shape, quant = [int(s) for s in spec["shape"]], spec.get("quantization")
        n = int(np.prod(shape)) if shape else 1
        if spec.get("dtype", "float32") != "float32":
            raise CheckpointError(f"face-api weight {spec['name']}: unsupported dtype {spec.get('dtype')}")
        if quant:
            qtype = {"uint8": np.uint8, "uint16": "<u2"}.get(quant["dtype"])
            if qtype is None:
                raise CheckpointError(f"face-api weight {spec['name']}: unsupported quantisation {quant['dtype']}")
            dtype = np.dtype(qtype)
        else:
            dtype = np.dtype("<f4")
        size = n * dtype.itemsize
        if offset + size > len(blob):
            raise CheckpointError(f"face-api weights end before {spec['name']}: the .bin file is truncated")
        raw = np.frombuffer(blob, dtype, n, offset)
        if quant:
            values = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
        else:
            values = raw.astype(np.float32)
        offset += size
        out[spec["name"]] = values.reshape(shape)
    if offset != len(blob):
        raise CheckpointError(f"face-api weights: {len(blob) - offset} bytes left over; manifest and .bin disagree")
    return out


def to_torch_state(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """TFJS layouts (HWIO filters, [in, out] dense) -> this module's state dict."""
    state = {}
    for name, w in weights.items():
        key = name.replace("/", ".")
        if key.startswith("fc.") and key.endswith(".weights"):
            key, w = key[: -len("weights")] + "weight", w.T
        elif key.endswith("depthwise_filter"):
            w = w.transpose(2, 3, 0, 1)         # [kh, kw, cin, 1] -> [cin, 1, kh, kw]
        elif key.endswith(("pointwise_filter", "filters")):
            w = w.transpose(3, 2, 0, 1)         # [kh, kw, cin, cout] -> [cout, cin, kh, kw]
        state[key] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return state


def _build(state: dict[str, torch.Tensor], where: str) -> AgeGenderNet:
    net = AgeGenderNet()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the face-api age/gender weights do not match the network: {e}") from e
    return net


def ensure_converted() -> Path:
    """`cache_dir("models")/face-api-age-gender/age_gender.safetensors`, converted once from the
    package (published atomically, with a JSON note of its source). ModelUnavailableError with the
    install command when the package is nowhere to be found."""
    from safetensors.torch import load_file, save_file

    target_dir = cache_dir("models", CACHE_NAME)
    target = target_dir / "age_gender.safetensors"
    note = target_dir / "mel-conversion.json"
    if target.is_file() and note.is_file():
        try:
            if json.loads(note.read_text()).get("format") == CONVERSION_FORMAT:
                return target
        except (OSError, ValueError):
            pass
    tried = _candidate_sources()
    found = None
    for source in tried:
        found = _read_from(source)
        if found:
            break
    if not found:
        raise ModelUnavailableError(f"{INSTALL_HINT} (looked in: {', '.join(str(p) for p in tried)})")
    specs, blob, where = found
    state = to_torch_state(decode_weights(specs, blob))
    _build(state, where)  # refuse weights that do not fit before publishing them
    remove_dead_temps(target_dir, [target.name, note.name])
    with atomic_write(target) as tmp:
        save_file(state, str(tmp), metadata={"source": f"{NPM_PACKAGE} {where}"})
    load_file(str(target))  # readable
    with atomic_write(note) as tmp:
        tmp.write_text(json.dumps({"format": CONVERSION_FORMAT, "package": NPM_PACKAGE, "source": where,
                                   "sha256": hashlib.sha256(blob).hexdigest()}, indent=2))
    return target


@cached_model
def load_age_gender_model(device: str = "cpu") -> AgeGenderModel:
    """The age/gender network, loaded once per device (see ensure_converted)."""
    from safetensors.torch import load_file

    path = ensure_converted()
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001  (a corrupt cache file: say where it is)
        raise CheckpointError(f"cannot read {path}: {e}; delete it and it will be converted again") from e
    return AgeGenderModel(_build(state, str(path)), device, source=str(path))
