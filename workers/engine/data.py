"""Data sets as in-memory tensors with stable sample indices, and forgetting splits.

Index i of `DatasetSplits.train` is the stable id the service registers for that sample: a loader
must return the same order for the same seed and options on every call, on every machine.

Images are held as normalised float32 tensors (N x C x H x W) and augmented on tensors, batch by
batch, on the training device (airbench's approach: no DataLoader, no per-image Python work), so
a CUDA run crops and flips on the GPU. Nothing is ever downloaded: every source is a local path.

Data sets (`load_dataset(name, seed, **options)`):
- "digits": scikit-learn's bundled 8x8 digits, stratified 80/20 train/test, 1-pixel shifts.
- "cifar10": CIFAR-10 from the project's JPEG archive (train/<class>/*.jpg, test/<class>/*.jpg)
  or from that tree unpacked. Source: the `root` option, else $QFORGET_CIFAR10_DIR, else
  $QFORGET_DATA_ROOT/cifar10 (a folder) or $QFORGET_DATA_ROOT/cifar10-jpg.tar.gz, else
  /work/shared/data/cifar10-jpg.tar.gz. An archive is decoded once into uint8 arrays kept in the
  cache folder ($QFORGET_CACHE_DIR, default ~/.cache/qforget/data); a folder's decode is cached
  there too.
- "imagefolder:<path>": any tree <path>/train/<class>/*, <path>/test/<class>/* (and optionally
  <path>/val/<class>/*) in torchvision's ImageFolder layout; images of one size (or the
  `image_size` option, which resizes).
- "cifar10-torchvision", "cifar100", "svhn": torchvision's data sets from their usual files in a
  local folder (`root` option, else $QFORGET_DATA_ROOT), download=False.

Image data sets share one recipe (the SalUn / l1-sparse reference split, CIFAR ResNet-18 papers):
- validation: `val_fraction` (default 0.1) of each class of the training files, chosen with a
  seeded permutation per class, becomes `DatasetSplits.val` (CIFAR-10: 45k train + 5k val); a
  val/ folder, where an ImageFolder tree has one, is used as it is instead. Test is kept whole.
- optional per-class subsets for CPU runs: `train_per_class`, `val_per_class`, `test_per_class`
  (seeded; the kept samples stay in file order).
- pixels are scaled to [0, 1] and standardised per channel with the train split's mean and std.
- training batches are randomly cropped from the image padded by 4 pixels of black (as
  torchvision's RandomCrop(32, padding=4) on unnormalised images) and flipped horizontally with
  probability 1/2 (not for SVHN: a mirrored digit is not the same digit); `augment=False` trains
  on the images as they are (a recipe that memorises its training set, for membership tests).
"""

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

DEFAULT_CIFAR10_ARCHIVE = Path("/work/shared/data/cifar10-jpg.tar.gz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    x: torch.Tensor  # N x C x H x W, float32
    y: torch.Tensor  # N, int64 class labels
    augment: Augment | None = None  # train-time augmentation; evaluation always sees x as is
    # Where the decoded pixels are cached (a split read from a cache file): each sample's row in the
    # file's "train" array, so that erasing a sample can rewrite the cache without it.
    cache_file: Path | None = None
    cache_rows: np.ndarray | None = None
    # Per channel, the lowest and highest value a valid pixel takes once normalised: from the
    # normalisation alone, so that synthetic inputs can be kept in range without reading a sample.
    pixel_range: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> "Split":
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.x[index], self.y[index], self.augment, pixel_range=self.pixel_range)

    def erase(self, indices: Sequence[int]) -> bool:
        """Blank the samples at `indices` in memory, and in the cache file this split was read from
        (rewritten, atomically, when it still holds any of them: a cache decoded again from the
        source has them back). The source files, the data owner's copy, are not touched. Indices
        beyond the split (samples registered beyond the data set) are not its samples: ignored.
        Returns whether the cache file was rewritten."""
        index = np.asarray([i for i in indices if i < len(self)], dtype=np.int64)
        if not len(index):
            return False
        self.x[torch.as_tensor(index, dtype=torch.long)] = 0.0
        if self.cache_file is None or self.cache_rows is None or not self.cache_file.exists():
            return False
        rows = self.cache_rows[index]
        with np.load(self.cache_file) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if not arrays["train_x"][rows].any():
            return False
        arrays["train_x"][rows] = 0
        write_arrays(self.cache_file, arrays)
        return True

    def training_batch(
        self, index: torch.Tensor, generator: torch.Generator, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at index, moved to device, then augmented there (if the split has an
        augmentation). The augmentation's random draws come from `generator` (on the CPU), so a
        batch is the same on every device."""
        x = self.x[index].to(device, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x, generator)
        return x, self.y[index].to(device, non_blocking=True)


@dataclass
class DatasetSplits:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    val: Split | None = None  # held-out part of the training files (None for digits)
    classes: list[str] = field(default_factory=list)  # class names, index = label


# Augmentations ------------------------------------------------------------------------------------


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels in each direction (a random crop of the
    padded image). Edges are replicated: zero padding would draw a grey frame on standardised
    inputs. Flips are left out on purpose: a mirrored digit is not the same digit."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # n, c, dy, dx, h, w: every crop, as a view
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    return windows[torch.arange(n, device=x.device), :, dy, dx]


@dataclass(frozen=True)
class CropFlip:
    """Random crop of the image padded by `padding` pixels of `fill` (one value per channel: the
    normalised black) and, when `flip`, a horizontal flip with probability 1/2. Works on a batch
    on any device; draws (dy, dx, flip) from the CPU generator."""

    padding: int = 4
    flip: bool = True
    fill: tuple[float, ...] = ()  # empty: zeros

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.padding
        fill = torch.tensor(self.fill or (0.0,) * c, dtype=x.dtype, device=x.device)
        padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # n, c, dy, dx, h, w (a view)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        out = windows[torch.arange(n, device=x.device), :, dy, dx]
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
        return out


# Forgetting splits --------------------------------------------------------------------------------


def random_forget_split(
    n_train: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget, retain) index tensors, sorted: round(fraction * n_train) samples drawn uniformly
    without replacement with a seeded generator (the papers use fractions 0.1, 0.3 and 0.5)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_forget = round(fraction * n_train)
    if not 0 < n_forget < n_train:
        raise ValueError(f"{fraction} of {n_train} samples leaves an empty forget or retain set")
    chosen = np.zeros(n_train, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n_train, size=n_forget, replace=False)] = True
    return torch.from_numpy(np.flatnonzero(chosen)), torch.from_numpy(np.flatnonzero(~chosen))


def classwise_forget_split(
    labels: torch.Tensor | np.ndarray | Sequence[int], class_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget, retain) index tensors, sorted: every sample of class_id, and all the others."""
    labels = torch.as_tensor(np.asarray(labels))
    is_forget = labels == class_id
    if not is_forget.any() or is_forget.all():
        raise ValueError(f"class {class_id} gives an empty forget or retain set")
    return torch.where(is_forget)[0], torch.where(~is_forget)[0]


# Digits -------------------------------------------------------------------------------------------


def load_digits_splits(seed: int) -> tuple[Split, Split]:
    """scikit-learn's 1797 8x8 digits (bundled, no download); stratified 80/20 train/test split;
    training batches are shifted by up to one pixel.

    Pixels (0..16) are scaled to [0, 1], then standardised with the train split's mean and std,
    so no test statistic leaks into the inputs.
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    mean, std = train_x.mean(), train_x.std()

    pixel_range = (torch.tensor([-mean / std]), torch.tensor([(1 - mean) / std]))

    def to_split(x, y, augment=None):
        x = torch.from_numpy((x - mean) / std).unsqueeze(1)
        return Split(x, torch.from_numpy(y).long(), augment, pixel_range=pixel_range)

    return to_split(train_x, train_y, random_shift), to_split(test_x, test_y)


# Image arrays -> splits ---------------------------------------------------------------------------


@dataclass
class ImageArrays:
    """Decoded images of one split: uint8 N x C x H x W, int64 labels."""

    x: np.ndarray
    y: np.ndarray


def per_class_choice(labels: np.ndarray, count, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing count(n_c) samples of each class c (seeded), others False."""
    chosen = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen[rng.permutation(members)[: count(len(members))]] = True
    return chosen


def subset_per_class(arrays: ImageArrays, per_class: int | None, seed: list[int]) -> tuple[ImageArrays, np.ndarray]:
    """The subset and the mask that chose it (all True without a subset)."""
    if per_class is None:
        return arrays, np.ones(len(arrays.y), dtype=bool)
    if per_class < 1:
        raise ValueError(f"per-class subset sizes must be >= 1, got {per_class}")
    keep = per_class_choice(arrays.y, lambda n: per_class, np.random.default_rng(seed))
    return ImageArrays(arrays.x[keep], arrays.y[keep]), keep


def channel_mean_std(x: np.ndarray, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 N x C x H x W pixels scaled to [0, 1], in float64,
    a chunk at a time (a float64 copy of CIFAR-10 would take a gigabyte)."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) / 255
        total += part.sum(axis=(0, 2, 3))
        squares += (part**2).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return torch.from_numpy(mean), torch.from_numpy(std).clamp(min=1e-6)


def make_image_splits(
    train: ImageArrays,
    test: ImageArrays,
    seed: int,
    val: ImageArrays | None = None,
    val_fraction: float = 0.1,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    flip: bool = True,
    padding: int = 4,
    augment: bool = True,
) -> tuple[Split, Split, Split | None]:
    """The shared image recipe (module docstring): validation split, subsets, normalisation,
    crop-and-flip augmentation. Returns (train, test, val)."""
    train_rows = np.arange(len(train.y))  # each kept training sample's row in the decoded arrays
    if val is None and val_fraction > 0:
        if not val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        rng = np.random.default_rng(seed)
        is_val = per_class_choice(train.y, lambda n: round(val_fraction * n), rng)
        val = ImageArrays(train.x[is_val], train.y[is_val])
        train = ImageArrays(train.x[~is_val], train.y[~is_val])
        train_rows = train_rows[~is_val]
    # Separate seeded streams per split, so that a subset of one does not move another's.
    train, kept = subset_per_class(train, train_per_class, [seed, 1])
    train_rows = train_rows[kept]
    test, _ = subset_per_class(test, test_per_class, [seed, 2])
    if val is not None:
        val, _ = subset_per_class(val, val_per_class, [seed, 3])

    mean, std = channel_mean_std(train.x)
    train_augment = CropFlip(padding, flip, tuple((-mean / std).tolist())) if augment else None

    pixel_range = (-mean.float() / std.float(), (1 - mean.float()) / std.float())

    def to_split(arrays: ImageArrays, augment=None) -> Split:
        x = torch.from_numpy(arrays.x).float().div_(255)
        x = x.sub_(mean.float().view(1, -1, 1, 1)).div_(std.float().view(1, -1, 1, 1))
        return Split(x, torch.from_numpy(arrays.y).long(), augment, pixel_range=pixel_range)

    train_split = to_split(train, train_augment)
    train_split.cache_rows = train_rows
    return (
        train_split,
        to_split(test),
        to_split(val) if val is not None and len(val.y) else None,
    )


# Decoding and caching -----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("QFORGET_CACHE_DIR") or Path.home() / ".cache" / "qforget" / "data")


def decode_image(data: bytes | Path, image_size: int | None = None) -> np.ndarray:
    """C x H x W uint8; grayscale images give C = 1, everything else RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image = image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def stack_images(images: list[np.ndarray], labels: list[int], where: str) -> ImageArrays:
    if not images:
        raise ValueError(f"no images found in {where}")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {where} differ in shape (channels x height x width) "
                         f"{sorted(shapes)[:3]}; pass image_size to resize them")
    return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64))


def folder_listing(root: Path, classes: list[str] | None = None) -> tuple[list[str], list]:
    """ImageFolder order: classes sorted by name (or as given), files sorted within a class."""
    if classes is None:
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    files = [
        (path, label)
        for label, name in enumerate(classes)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, files


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz written whole under a temporary name, then moved over `path`: a reader sees the old
    file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temp, **arrays)
    os.replace(temp, path)


def cached(key: str, build: Callable[[], dict[str, ImageArrays]], use_cache: bool):
    """(build(), None), or its result as stored under the cache folder for key (one .npz per key)
    with the file's path."""
    path = cache_dir() / f"{key}.npz"
    if use_cache and path.exists():
        with np.load(path) as stored:
            names = sorted({name.rsplit("_", 1)[0] for name in stored.files})
            return {name: ImageArrays(stored[f"{name}_x"], stored[f"{name}_y"]) for name in names}, path
    result = build()
    if not use_cache:
        return result, None
    write_arrays(path, {f"{name}_{part}": getattr(arrays, part) for name, arrays in result.items()
                        for part in ("x", "y")})
    return result, path


def read_image_folder(
    root: Path, image_size: int | None = None, use_cache: bool = True
) -> tuple[dict[str, ImageArrays], list[str], Path | None]:
    """Decode root/{train,test[,val]}/<class>/* into arrays; return (splits, class names, cache file)."""
    root = Path(root).expanduser().resolve()
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise FileNotFoundError(f"{root} has no {required}/ folder (ImageFolder layout "
                                    f"{root}/train/<class>/*, {root}/test/<class>/*)")
    classes, _ = folder_listing(root / "train")
    for name in SPLIT_NAMES:
        extra = {e.name for e in (root / name).iterdir() if e.is_dir()} - set(classes) \
            if (root / name).is_dir() else set()
        if extra:
            raise ValueError(f"{root / name} has classes {sorted(extra)} that train/ lacks")
    listings = {name: folder_listing(root / name, classes)[1]
                for name in SPLIT_NAMES if (root / name).is_dir()}
    fingerprint = hashlib.sha256(repr((str(root), image_size, classes)).encode())
    for name, files in listings.items():
        for path, label in files:
            stat = path.stat()
            entry = f"{name}/{path.name}/{label}/{stat.st_size}/{stat.st_mtime_ns}"
            fingerprint.update(entry.encode())

    def build():
        return {
            name: stack_images([decode_image(path, image_size) for path, _ in files],
                               [label for _, label in files], str(root / name))
            for name, files in listings.items()
        }

    arrays, cache_file = cached(f"folder-{fingerprint.hexdigest()[:24]}", build, use_cache)
    return arrays, classes, cache_file


def read_image_archive(
    archive: Path, image_size: int | None = None, use_cache: bool = True
) -> tuple[dict[str, ImageArrays], list[str], Path | None]:
    """Decode a tar(.gz) of [prefix/]{train,test[,val]}/<class>/<file> (read as a stream, never
    extracted to disk); ImageFolder order. Returns (splits, class names, cache file)."""
    archive = Path(archive).expanduser().resolve()
    stat = archive.stat()
    key = hashlib.sha256(repr((str(archive), stat.st_size, stat.st_mtime_ns, image_size)).encode())

    def build():
        members: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLIT_NAMES:
                    continue
                if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                split, class_name, file_name = parts[-3:]
                members.setdefault(split, {}).setdefault(class_name, []).append(
                    (file_name, tar.extractfile(member).read())
                )
        if "train" not in members or "test" not in members:
            raise ValueError(f"{archive} has no train/<class>/ and test/<class>/ images")
        names = sorted(members["train"])
        if not set(members["test"]) <= set(names):
            raise ValueError(f"{archive}: test classes {sorted(members['test'])} are not all "
                             f"among the train classes {names}")
        result = {}
        for split, by_class in members.items():
            images, labels = [], []
            for label, name in enumerate(names):
                for _, data in sorted(by_class.get(name, [])):
                    images.append(decode_image(data, image_size))
                    labels.append(label)
            result[split] = stack_images(images, labels, f"{archive}:{split}")
        result["classes"] = ImageArrays(np.asarray(names), np.arange(len(names)))
        return result

    result, cache_file = cached(f"archive-{key.hexdigest()[:24]}", build, use_cache)
    classes = [str(name) for name in result.pop("classes").x]
    return result, classes, cache_file


def read_image_source(source: Path, image_size=None, use_cache=True):
    source = Path(source).expanduser()
    if source.is_dir():
        return read_image_folder(source, image_size, use_cache)
    if source.is_file():
        return read_image_archive(source, image_size, use_cache)
    raise FileNotFoundError(f"no image folder or archive at {source}")


# Loaders ------------------------------------------------------------------------------------------

RECIPE_OPTIONS = ("val_fraction", "train_per_class", "val_per_class", "test_per_class", "augment")


def check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for data set {name!r}; "
                         f"allowed: {sorted(allowed)}")


def cifar10_source(root: str | Path | None = None) -> Path:
    """Where CIFAR-10 is read from (module docstring for the order)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("QFORGET_CIFAR10_DIR"):
        return Path(os.environ["QFORGET_CIFAR10_DIR"]).expanduser()
    if os.environ.get("QFORGET_DATA_ROOT"):
        data_root = Path(os.environ["QFORGET_DATA_ROOT"]).expanduser()
        for candidate in (data_root / "cifar10", data_root / "cifar10-jpg.tar.gz"):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"QFORGET_DATA_ROOT={data_root} has neither cifar10/ nor "
                                "cifar10-jpg.tar.gz")
    return DEFAULT_CIFAR10_ARCHIVE


def load_image_dataset(source, seed, image_size=None, cache=True, flip=True, expect_classes=None,
                       **options):
    arrays, classes, cache_file = read_image_source(source, image_size, cache)
    if expect_classes is not None and len(classes) != expect_classes:
        raise ValueError(f"{source} has {len(classes)} classes, expected {expect_classes}")
    train, test, val = make_image_splits(arrays["train"], arrays["test"], seed,
                                         val=arrays.get("val"), flip=flip, **options)
    train.cache_file = cache_file
    return train, test, val, classes


IMAGE_OPTIONS = RECIPE_OPTIONS + ("image_size", "cache")


def load_cifar10(seed: int, root=None, **options):
    check_options("cifar10", options, IMAGE_OPTIONS)
    return load_image_dataset(cifar10_source(root), seed, expect_classes=10, **options)


def load_image_folder(path: str, seed: int, **options):
    check_options(f"imagefolder:{path}", options, IMAGE_OPTIONS + ("flip",))
    return load_image_dataset(Path(path), seed, **options)


def torchvision_root(root) -> Path:
    if root is None:
        root = os.environ.get("QFORGET_DATA_ROOT")
    if not root:
        raise FileNotFoundError("torchvision data sets need a local folder: pass root= or set "
                                "QFORGET_DATA_ROOT (nothing is downloaded)")
    return Path(root).expanduser()


def load_torchvision(kind: str, seed: int, root=None, **options):
    """torchvision's CIFAR-10, CIFAR-100 or SVHN files in a local folder, download=False."""
    check_options(kind, options, RECIPE_OPTIONS)
    from torchvision import datasets

    root = torchvision_root(root)
    if kind == "svhn":
        parts = [datasets.SVHN(str(root), split=s, download=False) for s in ("train", "test")]
        arrays = [ImageArrays(np.ascontiguousarray(p.data), np.asarray(p.labels, np.int64))
                  for p in parts]
        classes = [str(digit) for digit in range(10)]
    else:
        source = datasets.CIFAR10 if kind == "cifar10-torchvision" else datasets.CIFAR100
        parts = [source(str(root), train=train, download=False) for train in (True, False)]
        arrays = [ImageArrays(np.ascontiguousarray(p.data.transpose(0, 3, 1, 2)),
                              np.asarray(p.targets, np.int64)) for p in parts]
        classes = list(parts[0].classes)
    train, test, val = make_image_splits(arrays[0], arrays[1], seed, flip=kind != "svhn",
                                         **options)
    return train, test, val, classes


@dataclass(frozen=True)
class DatasetInfo:
    """load(seed, **options) -> (train, test, val or None, class names)."""

    load: Callable
    num_classes: int
    in_channels: int


def digits_loader(seed: int, **options):
    check_options("digits", options, ())
    train, test = load_digits_splits(seed)
    return train, test, None, [str(digit) for digit in range(10)]


def torchvision_loader(kind: str) -> Callable:
    return lambda seed, **options: load_torchvision(kind, seed, **options)


DATASETS = {
    "digits": DatasetInfo(digits_loader, num_classes=10, in_channels=1),
    "cifar10": DatasetInfo(load_cifar10, num_classes=10, in_channels=3),
    "cifar10-torchvision": DatasetInfo(torchvision_loader("cifar10-torchvision"), 10, 3),
    "cifar100": DatasetInfo(torchvision_loader("cifar100"), num_classes=100, in_channels=3),
    "svhn": DatasetInfo(torchvision_loader("svhn"), num_classes=10, in_channels=3),
}
IMAGEFOLDER_PREFIX = "imagefolder:"


def image_folder_info(path: str) -> DatasetInfo:
    """Classes from <path>/train's folders, channels from the first image's mode."""
    classes, files = folder_listing(Path(path).expanduser() / "train")
    if not files:
        raise FileNotFoundError(f"no images under {path}/train/<class>/")
    channels = decode_image(files[0][0]).shape[0]
    return DatasetInfo(lambda seed, **options: load_image_folder(path, seed, **options),
                       num_classes=len(classes), in_channels=channels)


def dataset_info(name: str) -> DatasetInfo:
    if name.startswith(IMAGEFOLDER_PREFIX):
        return image_folder_info(name[len(IMAGEFOLDER_PREFIX):])
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} or "
                         f"'{IMAGEFOLDER_PREFIX}<path>'")
    return DATASETS[name]


def load_dataset(name: str, seed: int = 0, **options) -> DatasetSplits:
    """The named data set's splits (module docstring for names and options)."""
    info = dataset_info(name)
    train, test, val, classes = info.load(seed, **options)
    return DatasetSplits(name, train, test, info.num_classes, info.in_channels, val, classes)
