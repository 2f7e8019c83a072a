"""Sample quality through torch-fidelity: FID, KID, precision and recall, with a fixed protocol.

No weights are ever downloaded. Two feature extractors:

- ``digits-cnn`` (the default for the built-in data): a small classifier trained on a labelled
  dataset's train split by ``liftplace extractor train`` (``liftplace.recipes.train_extractor``)
  and shipped with the package, one per built-in data set that has its own
  (``liftplace/assets/extractor-mnist16.safetensors``, and ``extractor-glyphs16.safetensors``
  for ``glyphs``; any other data uses MNIST's); its 128-d penultimate layer is the feature
  space. Registered with torch-fidelity under that name.
- ``inception-v3-compat``: the standard FID network, used only when the user gives a local
  weights file (``weights-inception-2015-12-05-6726825d.pth``). A missing file is an error.

Every result carries the protocol (extractor, image count, sampler steps, seed) it was
computed under, so that no number is reported without it. Sampling a model and measuring its
samples is ``liftplace.evaluate``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from liftplace.storage import shown

ASSETS = Path(__file__).parent / "assets"
DEFAULT_EXTRACTOR = "digits-cnn"
DEFAULT_EXTRACTOR_WEIGHTS = ASSETS / "extractor-mnist16.safetensors"
# Built-in data sets with a digits-cnn of their own (a classifier of their labels); the others
# are measured with MNIST's.
SHIPPED_EXTRACTORS = {"glyphs": ASSETS / "extractor-glyphs16.safetensors"}
INCEPTION = "inception-v3-compat"


def cache_root() -> Path:
    """Where reference statistics are cached (override with LIFTPLACE_CACHE)."""
    return Path(os.environ.get("LIFTPLACE_CACHE", Path.home() / ".cache" / "liftplace")) / "fidelity"


def private_cache_root() -> Path:
    """cache_root(), created private to this user. torch-fidelity unpickles its cache files
    (not weights-only): a folder that others can write to is refused."""
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ValueError(f"the metrics cache {root} is owned or writable by another user; torch-fidelity unpickles "
                         "the files in it: point LIFTPLACE_CACHE at a folder of your own")
    return root


PRC_NEIGHBOURS = 3  # torch-fidelity's default k for precision and recall


@dataclass(frozen=True)
class Protocol:
    """How a number was measured. Recorded beside every metric."""

    num_images: int = 1000  # generated images, compared with as many real validation images
    sampler_steps: int = 50  # DDIM (or Euler for flow) steps per image
    seed: int = 0  # seeds the sampler's noise and torch-fidelity's KID subsets
    extractor: str = DEFAULT_EXTRACTOR
    extractor_weights: str | None = None  # None: the shipped digits-cnn weights
    prc: bool = True  # precision and recall (k = 3 nearest neighbours)
    data: str = "mnist"  # the data set measured: picks the shipped digits-cnn weights (SHIPPED_EXTRACTORS)
    # a text-to-image model's classifier-free guidance scale (1: unguided, the only value of every
    # other model; recorded as eval_guidance_scale only where it is not 1)
    guidance_scale: float = 1.0
    # a text-to-image model's CLIP score: a local CLIPModel directory (transformers' save_pretrained,
    # with its processor files); recorded as eval_clip_weights only where set
    clip_weights: str | None = None

    def __post_init__(self):
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) or not (
                math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"eval guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not (isinstance(self.num_images, int) and self.num_images >= 2):
            raise ValueError(f"eval num_images must be an integer >= 2, got {self.num_images!r}")
        if self.prc and self.num_images < PRC_NEIGHBOURS + 1:
            # torch-fidelity takes each image's k-th nearest neighbour among the others: it fails
            # (kthvalue out of range) at the end of a run, after the training, with fewer images.
            raise ValueError(f"eval num_images must be >= {PRC_NEIGHBOURS + 1} for precision and recall "
                             f"({PRC_NEIGHBOURS} nearest neighbours), got {self.num_images}; or set eval.prc=false")
        if self.extractor not in (DEFAULT_EXTRACTOR, INCEPTION):
            raise ValueError(f"unknown feature extractor {self.extractor!r}; choose {DEFAULT_EXTRACTOR} or {INCEPTION}")
        if self.extractor == INCEPTION and not self.extractor_weights:
            raise ValueError(
                f"{INCEPTION} needs a local weights file (extractor_weights=PATH to "
                "weights-inception-2015-12-05-6726825d.pth); nothing is downloaded"
            )
        if self.clip_weights is not None and not (Path(self.clip_path()) / "config.json").is_file():
            raise FileNotFoundError(f"CLIP weights not found: {shown(self.clip_weights)} is not a directory with a "
                                    "config.json (a CLIPModel saved by save_pretrained, with its processor files)")
        if self.extractor_weights and not Path(self.weights_path()).is_file():
            raise FileNotFoundError(f"feature extractor weights not found: {shown(self.extractor_weights)}")
        if self.extractor == INCEPTION:
            check_tensor_file(self.weights_path())

    def clip_path(self) -> str:
        """The CLIP weights' directory on this machine (for a URI: this machine's copy)."""
        from liftplace import storage

        if self.clip_weights and storage.is_uri(self.clip_weights):
            return str(storage.input_copy(self.clip_weights, "eval.clip_weights"))
        return str(Path(self.clip_weights).expanduser()) if self.clip_weights else ""

    def weights_path(self) -> str:
        """The weights file on this machine (for weights on a store, a URI: this machine's copy)."""
        from liftplace import storage

        if self.extractor_weights and storage.is_uri(self.extractor_weights):
            return str(storage.input_copy(self.extractor_weights, "eval.extractor_weights"))
        return str(self.extractor_weights or SHIPPED_EXTRACTORS.get(self.data, DEFAULT_EXTRACTOR_WEIGHTS))


def clip_score(images: Tensor, captions: list[str], weights: str | Path, *, batch: int = 250) -> float:
    """CLIP score of images [N, C, H, W] in [-1, 1] against their captions (Hessel et al. 2021,
    as torchmetrics computes it): the mean over images of max(100 cos(image embedding, caption
    embedding), 0), by a local ``CLIPModel`` directory and its processor (gray images repeated
    to RGB, resized and normalised by the processor; captions truncated to its tokenizer)."""
    model, processor = _clip(str(weights))
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    pixels = ((images.float() + 1) / 2).clamp(0, 1)
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    scores = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            inputs = processor(text=captions[start:start + batch], images=list(pixels[start:start + batch]),
                               return_tensors="pt", padding=True, truncation=True, do_rescale=False)
            out = model(**inputs)
            scores.append((100 * F.cosine_similarity(out.image_embeds, out.text_embeds)).clamp(min=0))
    return float(torch.cat(scores).mean())


@functools.lru_cache(maxsize=2)
def _clip(weights: str):
    """(CLIPModel, CLIPProcessor) of a local directory, loaded once per process (every
    evaluation of a run asks for them)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(weights, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(weights, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"CLIP weights {weights} do not load: {first}") from None
    return model, processor


def check_tensor_file(path: str | Path) -> None:
    """Refuse a .pth file that holds more than tensors. torch-fidelity loads the Inception
    weights unpickling them (not weights-only), which runs any code a pickle carries; the file
    must first load weights-only here."""
    stat = Path(path).stat()
    _check_tensor_file(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_tensor_file(path: str, size: int, mtime_ns: int) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        why = ("not tensors only" if "Weights only load failed" in str(err)
               else f"{type(err).__name__}: {' '.join(str(err).split())}")
        raise ValueError(f"feature extractor weights {path} refused: it does not load weights-only ({why}), "
                         "and torch-fidelity would unpickle the file, which can run code") from None


class DigitsCNN(nn.Module):
    """A small classifier for 1-channel images; its 128-d pooled activations are the features.

    x: [B, 1, R, R] in [-1, 1] -> (features [B, 128], logits [B, num_classes]).
    """

    def __init__(self, num_classes: int = 10, resolution: int = 16):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        features = self.body(x)
        return features, self.head(features)


def save_extractor(model: DigitsCNN, path: str | Path) -> None:
    meta = {"resolution": str(model.resolution), "num_classes": str(model.head.out_features)}
    save_file(model.state_dict(), str(path), metadata=meta)


def load_extractor(path: str | Path) -> DigitsCNN:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature extractor weights not found: {path} (train them: liftplace extractor train)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = DigitsCNN(int(meta.get("num_classes", 10)), int(meta.get("resolution", 16)))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


class DigitsCNNExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 [B, 3, H, W] in, ("features", "logits") out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_extractor(feature_extractor_weights_path or DEFAULT_EXTRACTOR_WEIGHTS)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        gray = x.float().mean(1, keepdim=True) / 127.5 - 1.0
        features, logits = self.net(gray)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


if DEFAULT_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DEFAULT_EXTRACTOR, DigitsCNNExtractor)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, 3, H, W] (grayscale repeated), as torch-fidelity wants."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class ImageTensors(torch.utils.data.Dataset):
    """A fixed set of images, served as torch-fidelity expects (uint8 [3, H, W])."""

    def __init__(self, images: Tensor):
        self.images = to_uint8_rgb(images.detach().cpu())

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def real_images(dataset, n: int) -> Tensor:
    """The first n images of a dataset (all of them when it holds fewer: the reference set of
    a split smaller than eval num_images, which a run states before it starts), [n, C, H, W]
    in [-1, 1]."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def tensor_digest(images: Tensor) -> str:
    """A short digest of a tensor's values (its shape and bytes)."""
    digest = hashlib.blake2b(str(tuple(images.shape)).encode(), digest_size=8)
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """A short digest of a file's bytes, computed once per (path, size, mtime)."""
    stat = Path(path).stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_metrics(fake: Tensor, real: Tensor, protocol: Protocol, *, real_cache_key: str | None = None) -> dict:
    """FID, KID (mean, std), precision and recall of fake against real images.

    fake, real: [N, C, H, W] in [-1, 1]. ``real_cache_key`` names the real set (dataset, split,
    resolution, count) so its features are computed once per extractor; torch-fidelity keys the
    cache by name only, so the key must change whenever the data does.
    """
    n = min(len(fake), len(real))
    kwargs = dict(
        input1=ImageTensors(fake),
        input2=ImageTensors(real),
        cuda=torch.cuda.is_available(),
        batch_size=250,
        fid=True,
        kid=True,
        prc=protocol.prc,
        kid_subset_size=min(1000, n),
        feature_extractor=protocol.extractor,
        feature_extractor_weights_path=protocol.weights_path(),
        rng_seed=protocol.seed,
        save_cpu_ram=True,  # no DataLoader worker processes (they clash with Ray workers)
        verbose=False,
        cache_root=str(private_cache_root()),
        cache=real_cache_key is not None,
    )
    if real_cache_key is not None:
        # torch-fidelity finds cached statistics by name alone: the name holds a digest of the
        # images compared and of the extractor's weights, so that replacing a folder's images
        # (or the weights) under the same path can never reuse stale statistics (it once gave
        # FID 163 where fresh statistics gave 1571).
        kwargs["input2_cache_name"] = (f"{real_cache_key}-n{len(real)}-{protocol.extractor}-{Path(protocol.weights_path()).stem}"
                                       f"-{tensor_digest(real)}-{file_digest(protocol.weights_path())}")
    out = torch_fidelity.calculate_metrics(**kwargs)
    result = {
        "eval_reference_images": len(real),  # the real images compared with (eval num_images, or all of a smaller split)
        "fid": float(out["frechet_inception_distance"]),
        "kid": float(out["kernel_inception_distance_mean"]),
        "kid_std": float(out["kernel_inception_distance_std"]),
    }
    if protocol.prc:
        result.update(precision=float(out["precision"]), recall=float(out["recall"]))
    return result


def protocol_record(protocol: Protocol) -> dict:
    """The protocol as flat `eval_*` fields, stored beside every metric."""
    quiet = {"guidance_scale": 1.0, "clip_weights": None}  # text-to-image settings, left out at their defaults
    return {f"eval_{k}": v for k, v in dataclasses.asdict(protocol).items() if not (k in quiet and v == quiet[k])}


def stack_dataset(dataset) -> tuple[Tensor, Tensor]:
    """All of a dataset as tensors: images [N, C, H, W], labels [N]."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)
