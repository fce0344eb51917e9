"""Image data sets on tiny fake trees in tmp_path (ImageFolder, tar archive, torchvision's file
formats), a real CIFAR-10 subset, the crop-and-flip augmentation and the forgetting splits."""

import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.engine import (
    CropFlip,
    Split,
    classwise_forget_split,
    load_dataset,
    random_forget_split,
)
from workers.engine.data import (
    DEFAULT_CIFAR10_ARCHIVE,
    cifar10_source,
    dataset_info,
    read_image_archive,
    read_image_folder,
)

CLASSES = [f"c{k}" for k in range(10)]
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 3


def raw_id(split, label, index):
    """The red value of pixel (0, 0): a distinct id for every fake image (0..138)."""
    return label * 14 + (index if split == "train" else 10 + index)


def write_tree(root: Path, size=8, mode="RGB", classes=CLASSES) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[0, 0, 0] = raw_id(split, label, index)
                image = Image.fromarray(pixels if mode == "RGB" else pixels[..., 0])
                image.save(root / split / name / f"{index:04d}.png")  # lossless
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("QFORGET_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "tree")


def ids(split: Split, reference: Split) -> list[int]:
    """Recover raw ids from normalised red values: the normalisation is affine and increasing,
    and the lowest (0) and highest (138) ids are in the reference's union of splits."""
    values = torch.cat([s.x[:, 0, 0, 0] for s in reference])
    low, high = values.min(), values.max()
    return ((split.x[:, 0, 0, 0] - low) / (high - low) * 138).round().long().tolist()


def test_image_folder_order_validation_split_and_normalisation(tree, cache):
    data = load_dataset(f"imagefolder:{tree}", seed=0)
    assert (data.num_classes, data.in_channels, data.classes) == (10, 3, CLASSES)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert data.train.x.shape == (90, 3, 8, 8) and data.train.x.dtype == torch.float32
    everything = [data.train, data.val, data.test]
    train_ids, val_ids, test_ids = (ids(s, everything) for s in everything)
    # ImageFolder order: by class, then by file name; 10% of each class held out for validation.
    assert train_ids == sorted(train_ids) and test_ids == sorted(test_ids)
    assert test_ids == [raw_id("test", c, j) for c in range(10) for j in range(3)]
    assert sorted(train_ids + val_ids) == [raw_id("train", c, i) for c in range(10)
                                           for i in range(10)]
    assert data.val.y.tolist() == list(range(10))
    assert torch.equal(data.train.y, torch.tensor(train_ids) // 14)
    # Standardised per channel with the train split's statistics.
    assert data.train.x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (data.train.x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    # Crop-and-flip pads with black (raw 0); evaluation splits are not augmented.
    augment = data.train.augment
    assert isinstance(augment, CropFlip) and (augment.padding, augment.flip) == (4, True)
    low = min(s.x[:, 0, 0, 0].min() for s in everything)  # raw 0
    assert augment.fill[0] == pytest.approx(low.item(), abs=1e-5)
    assert data.val.augment is None and data.test.augment is None

    again = load_dataset(f"imagefolder:{tree}", seed=0)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.val.y, data.val.y)
    other = load_dataset(f"imagefolder:{tree}", seed=1)
    assert ids(other.val, [other.train, other.val, other.test]) != val_ids


def test_per_class_subsets_are_seeded_subsets(tree, cache):
    full = load_dataset(f"imagefolder:{tree}", seed=3, val_fraction=0.2)
    part = load_dataset(f"imagefolder:{tree}", seed=3, val_fraction=0.2, train_per_class=4,
                        val_per_class=1, test_per_class=2)
    assert (len(part.train), len(part.val), len(part.test)) == (40, 10, 20)
    assert torch.bincount(part.train.y).tolist() == [4] * 10
    full_splits, part_splits = [full.train, full.val, full.test], [part.train, part.val, part.test]
    for whole, subset in zip(full_splits, part_splits):
        kept = ids(subset, part_splits)
        assert kept == sorted(kept) and set(kept) <= set(ids(whole, full_splits))
    again = load_dataset(f"imagefolder:{tree}", seed=3, val_fraction=0.2, train_per_class=4,
                         val_per_class=1, test_per_class=2)
    assert torch.equal(again.train.x, part.train.x)


def test_augment_false_trains_on_the_images_as_they_are(tree, cache):
    plain = load_dataset(f"imagefolder:{tree}", seed=0, augment=False)
    augmented = load_dataset(f"imagefolder:{tree}", seed=0)
    assert plain.train.augment is None and isinstance(augmented.train.augment, CropFlip)
    assert torch.equal(plain.train.x, augmented.train.x)
    generator = torch.Generator().manual_seed(0)
    x, _ = plain.train.training_batch(torch.arange(4), generator, "cpu")
    assert torch.equal(x, plain.train.x[:4])


def test_a_val_folder_is_used_as_it_is(tmp_path, cache):
    root = write_tree(tmp_path / "tree", classes=CLASSES[:2])
    (root / "test").rename(root / "val")
    write_tree(tmp_path / "other", classes=CLASSES[:2])
    (tmp_path / "other" / "test").rename(root / "test")
    data = load_dataset(f"imagefolder:{root}", seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 6, 6)


def test_archive_and_folder_decode_to_the_same_arrays(tree, tmp_path, cache):
    archive = tmp_path / "fake-cifar.tar.gz"
    files = sorted(p for p in tree.rglob("*.png"))
    random.Random(0).shuffle(files)  # the real archive is not in sorted order either
    with tarfile.open(archive, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(tree)))
    from_folder, classes, _ = read_image_folder(tree, use_cache=False)
    from_archive, archive_classes, _ = read_image_archive(archive, use_cache=False)
    assert classes == archive_classes == CLASSES
    for split in ("train", "test"):
        assert np.array_equal(from_folder[split].x, from_archive[split].x)
        assert np.array_equal(from_folder[split].y, from_archive[split].y)
    # "cifar10" reads either; the archive's decode is cached.
    data = load_dataset("cifar10", root=archive)
    assert len(list(cache.glob("archive-*.npz"))) == 1
    same = load_dataset("cifar10", root=tree)
    assert torch.equal(data.train.x, same.train.x) and torch.equal(data.test.y, same.test.y)


def test_folder_cache_follows_the_files(tree, cache):
    first = load_dataset(f"imagefolder:{tree}", seed=0)
    assert len(list(cache.glob("folder-*.npz"))) == 1
    assert torch.equal(load_dataset(f"imagefolder:{tree}", seed=0).train.x, first.train.x)
    image = tree / "test" / "c0" / "0000.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)  # new content, new mtime
    changed = load_dataset(f"imagefolder:{tree}", seed=0)
    assert not torch.equal(changed.test.x[0], first.test.x[0])
    assert len(list(cache.glob("folder-*.npz"))) == 2
    load_dataset(f"imagefolder:{tree}", seed=0, cache=False, image_size=4)
    assert len(list(cache.glob("folder-*.npz"))) == 2


def test_grayscale_folder_resize_and_bad_input(tmp_path, cache):
    root = write_tree(tmp_path / "gray", size=6, mode="L", classes=CLASSES[:3])
    assert (dataset_info(f"imagefolder:{root}").in_channels,
            dataset_info(f"imagefolder:{root}").num_classes) == (1, 3)
    data = load_dataset(f"imagefolder:{root}", image_size=4, val_fraction=0)
    assert data.train.x.shape == (30, 1, 4, 4) and data.val is None
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "train" / "c0" / "odd.png")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(f"imagefolder:{root}")
    with pytest.raises(ValueError, match="unknown option"):
        load_dataset(f"imagefolder:{root}", train_per_clas=3)
    with pytest.raises(FileNotFoundError):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="expected 10"):
        load_dataset("cifar10", root=root, image_size=4)


def test_cifar10_source_order(tmp_path, monkeypatch):
    for name in ("QFORGET_CIFAR10_DIR", "QFORGET_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    assert cifar10_source() == DEFAULT_CIFAR10_ARCHIVE
    (tmp_path / "root" / "cifar10").mkdir(parents=True)
    monkeypatch.setenv("QFORGET_DATA_ROOT", str(tmp_path / "root"))
    assert cifar10_source() == tmp_path / "root" / "cifar10"
    monkeypatch.setenv("QFORGET_CIFAR10_DIR", str(tmp_path / "env"))
    assert cifar10_source() == tmp_path / "env"
    assert cifar10_source(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("QFORGET_CIFAR10_DIR")
    monkeypatch.setenv("QFORGET_DATA_ROOT", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="cifar10"):
        cifar10_source()


@pytest.fixture(scope="module")
def real_cifar_subset(tmp_path_factory):
    """A fixed subset of the project's archive: the first four training files it lists per class,
    two kept as train/, two as test/ (the archive lists the test files last; reading stops
    early)."""
    if not DEFAULT_CIFAR10_ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {DEFAULT_CIFAR10_ARCHIVE}")
    root = tmp_path_factory.mktemp("cifar-subset")
    found = {}
    with tarfile.open(DEFAULT_CIFAR10_ARCHIVE, "r:gz") as tar:
        for member in tar:
            path = Path(member.name)
            if not member.isfile() or path.parts[-3] != "train" or found.get(path.parent, 0) == 4:
                continue
            found[path.parent] = found.get(path.parent, 0) + 1
            split = "train" if found[path.parent] <= 2 else "test"
            target = root / split / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            if len(found) == 10 and all(count == 4 for count in found.values()):
                break
    return root


def test_real_cifar10_subset(real_cifar_subset, cache):
    data = load_dataset("cifar10", root=real_cifar_subset, val_fraction=0, cache=False)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]
    assert data.train.x.shape == (20, 3, 32, 32) and data.test.x.shape == (20, 3, 32, 32)
    assert data.train.y.tolist() == [c for c in range(10) for _ in range(2)]
    first = np.asarray(Image.open(min((real_cifar_subset / "test" / "airplane").iterdir())))
    arrays, _, _ = read_image_folder(real_cifar_subset, use_cache=False)
    assert np.array_equal(arrays["test"].x[0], first.transpose(2, 0, 1))


# torchvision's formats ---------------------------------------------------------------------------


@pytest.fixture
def no_checksums(monkeypatch):
    """The fake files cannot match torchvision's md5 sums."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *a, **k: True)


def pixels(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_torchvision_cifar10_and_cifar100_from_a_local_folder(tmp_path, monkeypatch, no_checksums):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k in range(1, 6):
        batch = {"data": pixels(20, k), "labels": [i % 10 for i in range(20)]}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
    test = {"data": pixels(10, 9), "labels": list(range(10))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    monkeypatch.setenv("QFORGET_DATA_ROOT", str(tmp_path))
    data = load_dataset("cifar10-torchvision", seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 10)
    assert data.classes == CLASSES and data.train.augment.flip
    # CHW from torchvision's HWC: channel 0 of test image 0 is the first 1024 bytes.
    raw = test["data"][0, :1024].astype(np.float64)
    assert np.corrcoef(raw, data.test.x[0, 0].flatten().numpy())[0, 1] > 0.999

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"f{k}" for k in range(100)]
    (folder / "train").write_bytes(pickle.dumps({"data": pixels(200, 1),
                                                 "fine_labels": list(range(100)) * 2}))
    (folder / "test").write_bytes(pickle.dumps({"data": pixels(100, 2),
                                                "fine_labels": list(range(100))}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    data = load_dataset("cifar100", root=tmp_path, val_fraction=0.5)
    sizes = (data.num_classes, len(data.train), len(data.val), len(data.test))
    assert sizes == (100, 100, 100, 100)
    assert data.classes == names


def test_torchvision_svhn_without_flips(tmp_path, no_checksums):
    from scipy.io import savemat

    for split, n in (("train", 40), ("test", 10)):
        images = np.random.default_rng(n).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = np.arange(1, n + 1).reshape(-1, 1) % 10 + 1  # SVHN's 10 means digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": images, "y": labels})
    data = load_dataset("svhn", root=tmp_path, val_fraction=0)
    assert data.train.x.shape == (40, 3, 32, 32) and len(data.test) == 10
    assert set(data.train.y.tolist()) == set(range(10))
    assert not data.train.augment.flip  # a mirrored digit is not the same digit


def test_torchvision_sets_need_a_local_folder(monkeypatch):
    monkeypatch.delenv("QFORGET_DATA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_dataset("svhn")


# Augmentation ------------------------------------------------------------------------------------


def test_crop_flip_outputs_are_padded_crops_or_their_mirror_images():
    torch.manual_seed(0)
    x = torch.randn(300, 2, 6, 6)
    fill = (-1.5, 2.0)
    augment = CropFlip(padding=2, flip=True, fill=fill)
    out = augment(x, torch.Generator().manual_seed(1))
    padded = torch.tensor(fill).view(1, 2, 1, 1).repeat(300, 1, 10, 10)
    padded[:, :, 2:8, 2:8] = x
    crops = torch.stack([padded[..., dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)])
    plain = (crops == out).flatten(2).all(dim=2)  # crop option x image
    mirrored = (crops.flip(-1) == out).flatten(2).all(dim=2)
    assert (plain | mirrored).any(dim=0).all()  # every output is a crop or a mirrored crop
    assert 0.35 < mirrored.any(dim=0).float().mean() < 0.65  # flipped about half the time
    assert len(set(plain.float().argmax(dim=0)[plain.any(dim=0)].tolist())) > 10
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1)))  # seeded
    assert torch.equal(CropFlip(padding=0, flip=False)(x, torch.Generator()), x)


def test_training_batches_are_augmented_evaluation_splits_are_not(tree, cache):
    data = load_dataset(f"imagefolder:{tree}", seed=0)
    index = torch.arange(32)
    x, y = data.train.training_batch(index, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(y, data.train.y[:32]) and not torch.equal(x, data.train.x[:32])
    x_test, _ = data.test.training_batch(torch.arange(8), torch.Generator(), "cpu")
    assert torch.equal(x_test, data.test.x[:8])


# Forgetting splits -------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction, expected", [(0.1, 4500), (0.3, 13500), (0.5, 22500)])
def test_random_forget_split_sizes_and_reproducibility(fraction, expected):
    forget, retain = random_forget_split(45000, fraction, seed=2)
    assert len(forget) == expected and len(retain) == 45000 - expected
    assert torch.equal(torch.sort(torch.cat([forget, retain])).values, torch.arange(45000))
    assert torch.all(forget[1:] > forget[:-1]) and torch.all(retain[1:] > retain[:-1])
    again, _ = random_forget_split(45000, fraction, seed=2)
    other, _ = random_forget_split(45000, fraction, seed=3)
    assert torch.equal(again, forget) and not torch.equal(other, forget)
    with pytest.raises(ValueError):
        random_forget_split(10, 1.0, seed=0)


def test_classwise_forget_split():
    labels = torch.tensor([3, 1, 3, 0, 2, 3, 1])
    forget, retain = classwise_forget_split(labels, 3)
    assert forget.tolist() == [0, 2, 5] and retain.tolist() == [1, 3, 4, 6]
    assert classwise_forget_split(labels.numpy(), 0)[0].tolist() == [3]
    with pytest.raises(ValueError):
        classwise_forget_split(labels, 7)
