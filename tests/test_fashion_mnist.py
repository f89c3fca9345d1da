"""Fashion-MNIST's IDX reader on files the tests write (gzipped and plain, every header check,
every bad-file error), torchvision's own IDX reader as the oracle, and the data taken by the demo
and the Lightning data module. No test needs Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest

from smooth_infonce.integrations.data import fashion_mnist as fm

from integration_helpers import fake_fashion_mnist

INSTALL = "apt-get install dataset-fashion-mnist"


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    return folder, fake_fashion_mnist(folder, gz=True)


# --- the IDX format ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["array", "array.gz"])
def test_round_trip_every_idx_type_gzipped_or_not(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    fm.write_idx(tmp_path / name, array)
    read = fm.read_idx(tmp_path / name)
    assert read.dtype == np.dtype(dtype) and read.shape == (2, 3, 5)
    np.testing.assert_array_equal(read, array)


def test_the_bytes_are_the_idx_layout(tmp_path):
    """Magic 0x00000803, big-endian dimensions, then the data row-major: written by hand here."""
    pixels = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    (tmp_path / "x").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 1, 2, 3) + pixels.tobytes())
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "x"), pixels)
    (tmp_path / "y").write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">2i", -5, 70000))
    assert fm.read_idx(tmp_path / "y").tolist() == [-5, 70000]


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    fm.write_idx(tmp_path / "a.gz", np.ones((4,), np.uint8))
    shutil.copy(tmp_path / "a.gz", tmp_path / "no-suffix")
    assert fm.read_idx(tmp_path / "no-suffix").tolist() == [1, 1, 1, 1]


def test_agrees_with_torchvisions_reader(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2, 8], np.uint8)
    fm.write_idx(tmp_path / "images", images)
    fm.write_idx(tmp_path / "labels", labels)
    np.testing.assert_array_equal(read_image_file(str(tmp_path / "images")).numpy(), fm.read_idx(tmp_path / "images"))
    np.testing.assert_array_equal(read_label_file(str(tmp_path / "labels")).numpy(), fm.read_idx(tmp_path / "labels"))


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files_agree_with_torchvisions_reader(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for split, (prefix, count) in fm.SPLITS.items():
        images, labels = fm.load_fashion_mnist(split)
        assert images.shape == (count, 28, 28) and np.bincount(labels).tolist() == [count // 10] * 10
        for kind, reader, mine in (("images-idx3", read_image_file, images), ("labels-idx1", read_label_file, labels)):
            plain = tmp_path / f"{prefix}-{kind}-ubyte"
            plain.write_bytes(gzip.decompress(fm.find_file(plain.name).read_bytes()))
            np.testing.assert_array_equal(reader(str(plain)).numpy(), mine)


# --- every bad file gets an error naming the file, the expectation and the install line ----------------

def idx_bytes(magic: bytes, dims, body: bytes) -> bytes:
    return magic + struct.pack(f">{len(dims)}I", *dims) + body


@pytest.mark.parametrize("content, expected", [
    (b"", "shorter than the 4-byte IDX magic"),
    (idx_bytes(b"\x01\x00\x08\x01", (2,), b"ab"), "magic number 0x01000801 is not IDX's"),
    (idx_bytes(b"\x00\x00\x07\x01", (2,), b"ab"), "magic number 0x00000701 is not IDX's"),
    (b"\x00\x00\x08\x00", "magic number 0x00000800 is not IDX's"),
    (b"\x00\x00\x08\x03" + struct.pack(">2I", 1, 2), "truncated header: 3 dimensions need 16 bytes"),
    (idx_bytes(b"\x00\x00\x08\x01", (3,), b"ab"),
     "truncated: dimensions (3,) of uint8 need 3 data bytes, the file has 2"),
    (idx_bytes(b"\x00\x00\x08\x01", (1,), b"ab"), "longer than its header says"),
    (idx_bytes(b"\x00\x00\x0c\x01", (1,), b"abc"), "dimensions (1,) of int32 need 4 data bytes"),
])
def test_bad_headers_and_lengths(tmp_path, content, expected):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(fm.FashionMNISTError) as info:
        fm.read_idx(path)
    message = str(info.value)
    assert str(path) in message and expected in message and INSTALL in message


def test_truncated_gzip(tmp_path):
    fm.write_idx(tmp_path / "full.gz", np.zeros((100, 28, 28), np.uint8))
    data = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(fm.FashionMNISTError, match=r"cut\.gz: a gzip file that does not decompress .*truncated"):
        fm.read_idx(tmp_path / "cut.gz")


def test_dimensions_are_checked_against_the_expected_shape(tmp_path):
    fm.write_idx(tmp_path / "x", np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(fm.FashionMNISTError, match=r"dimensions \(3, 28, 27\), expected \(3, 28, 28\)"):
        fm.read_idx(tmp_path / "x", (3, 28, 28))


def test_missing_file_names_it_the_places_looked_and_the_install_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fm.load_fashion_mnist("test", tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte(.gz) not found" in message and INSTALL in message
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte") in message


def test_wrong_counts_types_and_labels_are_refused(tmp_path):
    fm.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10_000, 28, 28), np.uint8))
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((9_999,), np.uint8))
    with pytest.raises(fm.FashionMNISTError, match=r"labels-idx1-ubyte: dimensions \(9999,\), expected \(10000,\)"):
        fm.load_fashion_mnist("test", tmp_path)
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full((10_000,), 10, np.uint8))
    with pytest.raises(fm.FashionMNISTError, match="label 10 is outside the 10 classes"):
        fm.load_fashion_mnist("test", tmp_path)
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((10_000,), np.int32))
    with pytest.raises(fm.FashionMNISTError, match="t10k-labels-idx1-ubyte: IDX type is not 0x08"):
        fm.load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        fm.load_fashion_mnist("validation", tmp_path)


# --- where the files are found ------------------------------------------------------------------------------

def test_reads_a_directory_and_torchvisions_layout(fake_dir, tmp_path):
    folder, arrays = fake_dir
    images, labels = fm.load_fashion_mnist("test", folder)
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    raw = tmp_path / "root" / "FashionMNIST" / "raw"  # torchvision's FashionMNIST(root) layout, unzipped files
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))
    np.testing.assert_array_equal(fm.load_fashion_mnist("test", tmp_path / "root")[0], arrays["test"][0])


def test_images_are_lazy_rgb_pil_with_labels(fake_dir):
    folder, arrays = fake_dir
    images = fm.fashion_mnist_images("train", folder)
    assert len(images) == 60_000
    picture, label = images[123]
    assert picture.mode == "RGB" and picture.size == (28, 28) and label == int(arrays["train"][1][123])
    np.testing.assert_array_equal(np.asarray(picture)[..., 0], arrays["train"][0][123])


@pytest.mark.parametrize("spec, directory", [("fashion-mnist", None), ("fashion-mnist:/data/fm", "/data/fm")])
def test_data_spec(spec, directory):
    assert fm.is_data_spec(spec) and fm.parse_data_spec(spec) == directory


def test_bad_data_specs(tmp_path):
    assert not fm.is_data_spec(None) and not fm.is_data_spec(str(tmp_path))
    with pytest.raises(ValueError, match="give a directory after the colon"):
        fm.parse_data_spec("fashion-mnist:")
    with pytest.raises(ValueError, match="is not fashion-mnist"):
        fm.parse_data_spec("mnist")


# --- the demo and the Lightning data module take it ---------------------------------------------------------

def test_the_demo_trains_on_fashion_mnist(fake_dir, tmp_path):
    from smooth_infonce.integrations.demo import cli as demo

    folder, _ = fake_dir
    config = demo.parse_args(["--data", f"fashion-mnist:{folder}", "--max-images", "300", "--epochs", "1",
                              "--batch-size", "64", "--width", "4", "--view-cache", "2", "--seeds", "0",
                              "--runs", "plain", "--no-plot", "--no-progress", "--out", str(tmp_path)])
    outcome = demo.run_demo(config)
    assert "Fashion-MNIST" in outcome["header"] and "300 pre-training / memory images, 10000 held-out" in \
        outcome["header"]
    # the fake classes are templates plus noise: raw pixels must find them
    assert outcome["references"]["raw pixels"]["knn_top1"] > 0.9
    # one epoch of pre-training already moves the probe well past the untrained network's (seed 0 on
    # CPU: 0.84 against 0.67): the run trained on these images, not merely ran
    trained, untrained = outcome["results"][0], outcome["references"]["random init"]
    assert trained.linear_top1 > untrained["linear_top1"] + 0.05 and len(trained.loss_per_epoch) == 1


def test_the_demo_refuses_missing_files_with_the_install_line(tmp_path, capsys):
    from smooth_infonce.integrations.demo import cli as demo

    with pytest.raises(SystemExit) as info:
        demo.parse_args(["--data", f"fashion-mnist:{tmp_path}"])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "train-images-idx3-ubyte(.gz) not found" in error and INSTALL in error


def test_the_lightning_data_module_reads_it(fake_dir):
    from smooth_infonce.integrations.lightning import PretrainDataModule
    from smooth_infonce.integrations.recipes import get_preset

    folder, arrays = fake_dir
    recipe = get_preset("light_moco", backbone__name="tiny_cnn", views=fm.fashion_mnist_views(16))
    data = PretrainDataModule(recipe, root=f"fashion-mnist:{folder}", batch_size=4)
    data.setup("fit")
    assert len(data.dataset) == 60_000
    views, _ = next(iter(data.train_dataloader()))[:2]
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2


def test_stratified_subset_keeps_every_class_share(fake_dir):
    from smooth_infonce.integrations.data.digits import stratified_subset

    _, arrays = fake_dir
    labels = arrays["train"][1].tolist()
    chosen = stratified_subset(labels, 1000, seed=0)
    assert len(chosen) == len(set(chosen)) == 1000 and chosen == sorted(chosen)
    share = np.bincount(np.asarray(labels)[chosen], minlength=10) / 1000
    np.testing.assert_allclose(share, np.bincount(labels, minlength=10) / len(labels), atol=0.002)
    assert stratified_subset(labels, 1000, seed=0) == chosen != stratified_subset(labels, 1000, seed=1)
