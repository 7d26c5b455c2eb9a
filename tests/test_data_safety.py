"""Data safety: what a hostile, odd or missing input does. Planted pickles never run, empty splits never
train, odd sample rates and decompression bombs stay cheap, non-regular text paths never block, and an
offline download fails at once with the URL to fetch by hand."""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import socket
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.transforms as T
from fixtures_vision_audio import (
    py2_pickle,
    tone,
    write_cifar10,
    write_image_tree,
    write_mnist,
    write_speech_commands,
    write_urbansound8k,
)
from PIL import Image, ImageFile

from astraora.data import common, vision
from astraora.data import text as text_data
from astraora.data.audio import (
    MAX_RATIO_TERM,
    SpeechCommandsDataModule,
    UrbanSound8KDataModule,
    read_audio,
    resampler,
    resampling_rates,
)
from astraora.data.text import TextFileDataModule, TinyShakespeareDataModule, WikiText2DataModule
from astraora.data.vision import (
    CIFAR10_MD5,
    CIFAR10DataModule,
    ImageFiles,
    ImageFolderDataModule,
    MNISTDataModule,
    read_cifar_batch,
)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError

# ------------------------------------------------------------------------------ CIFAR-10 pickles


def pickle_globals(data: bytes) -> set[str]:
    """The ``module.name`` of every GLOBAL a protocol ≤ 2 pickle references."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_cifar10_fixture_in_the_official_format_loads(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=5, test=3)
    raw = (folder / "data_batch_1").read_bytes()
    assert pickle_globals(raw) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    expected = pickle.loads(raw, encoding="latin1")
    images, labels = read_cifar_batch(folder / "data_batch_1")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images.reshape(5, -1), torch.from_numpy(expected["data"]))
    assert labels.tolist() == expected["labels"]
    # numpy 2 spells the reconstructor numpy._core.multiarray._reconstruct: a batch re-written by Python 3 loads too
    rewritten = tmp_path / "rewritten"
    rewritten.write_bytes(pickle.dumps(expected, protocol=4))
    assert torch.equal(read_cifar_batch(rewritten)[0], images)


class RunsCode:
    """Unpickling this calls ``function(*args)``: the classic planted pickle."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "inside the data"])
def test_cifar10_planted_pickle_is_refused_and_never_runs(tmp_path, payload):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    planted = {
        "os.system": RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": RunsCode(exec, f"open({str(marker)!r}, 'w').close()"),
        "inside the data": {"data": RunsCode(os.system, f"touch {marker}"), "labels": [1]},
    }[payload]
    (folder / "data_batch_3").write_bytes(pickle.dumps(planted, protocol=2))
    dm = CIFAR10DataModule(tmp_path, download=False, verify=False, num_workers=0)
    with pytest.raises(DataFileError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert "\n" not in message and str(folder / "data_batch_3") in message
    assert ("posix.system" in message or "__builtin__.exec" in message) and "does not use" in message
    assert not marker.exists()


def test_cifar10_batches_are_checked_against_the_official_md5(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataFileError, match=r"data_batch_1 has MD5 [0-9a-f]{32}, not c99cafc1.*verify=false"):
        CIFAR10DataModule(tmp_path, download=False).setup("fit")  # verify=true by default; not the official files
    # files whose MD5 is the recorded one are used (here the fixture's digests stand in for the official ones)
    import hashlib

    digests = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in CIFAR10_MD5}
    monkeypatch.setattr(vision, "CIFAR10_MD5", digests)
    dm = CIFAR10DataModule(tmp_path, batch_size=4, download=False, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 20


def test_cifar10_wrong_contents_are_one_line(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataFileError, match="test_batch is not a readable CIFAR-10 batch.*N × 3072"):
        read_cifar_batch(folder / "test_batch")


# ------------------------------------------------------------------------------------ empty splits


def test_empty_or_one_example_training_split_refuses_to_start(tmp_path):
    write_mnist(tmp_path, train=2, test=4)
    dm = MNISTDataModule(tmp_path, val_fraction=0.5, download=False, num_workers=0)
    with pytest.raises(
        DataFileError,
        match=r"'mnist': the training split from .*MNIST/raw "
        r"\(task.datamodule.val_fraction=0.5\) has 1 example",
    ):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="val_fraction=1.0"):
        MNISTDataModule(tmp_path, val_fraction=1.0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        MNISTDataModule(tmp_path, batch_size=0)


def test_empty_audio_splits_name_their_source(tmp_path):
    write_urbansound8k(tmp_path)
    with pytest.raises(
        DataFileError,
        match=r"training split of .*UrbanSound8K \(readable clips of folds \[11\], "
        r"task.datamodule.train_folds\) has 0",
    ):
        UrbanSound8KDataModule(data_dir=tmp_path, train_folds=[11], num_workers=0).setup("fit")
    dm = UrbanSound8KDataModule(data_dir=tmp_path, val_folds=[], num_workers=0)  # no val folds: on purpose
    dm.setup("fit")
    assert len(dm.val_set) == 0 and len(dm.train_set) == 24

    folder = write_speech_commands(tmp_path)
    (folder / "validation_list.txt").write_text("yes/not_there.wav\n")
    with pytest.raises(DataFileError, match="the val split of .*validation_list.txt names.*is empty"):
        SpeechCommandsDataModule(tmp_path, download=False, num_workers=0).setup("fit")


def test_text_settings_that_train_zero_steps_are_refused():
    for key in ("samples_per_epoch", "batch_size", "block_size"):
        with pytest.raises(ConfigError, match=f"task.datamodule.{key}=0"):
            WikiText2DataModule(download=False, **{key: 0})


# ------------------------------------------------------------------------------------ resampling

COMMON_RATES = (8000, 11025, 22050, 32000, 44100, 48000, 96000)


def test_resampling_kernel_is_bounded_for_any_rate():
    biggest_common = max(resampler(rate, 16000).kernel.numel() for rate in COMMON_RATES)
    for rate in (8009, 44101, 7919, 96001, 192013, 4001):
        orig, new = resampling_rates(rate, 16000)
        assert max(orig, new) <= MAX_RATIO_TERM
        assert abs((new / orig) / (16000 / rate) - 1) < 5e-4  # the pitch error the docstring states
        kernel = resampler(rate, 16000).kernel
        assert kernel.numel() <= 1_100_000 and kernel.numel() <= 20 * biggest_common
    assert abs(np.divide(*reversed(resampling_rates(8009, 16000))) / (16000 / 8009) - 1) < 1e-6


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_common_rates_resample_exactly_as_before(tmp_path, rate):
    path = tmp_path / f"{rate}.wav"
    sf.write(path, tone(440, 0.3, rate), rate)
    wave = torch.from_numpy(sf.read(str(path), dtype="float32", always_2d=True)[0]).mean(dim=1)
    assert resampling_rates(rate, 16000) == (rate, 16000)
    assert torch.equal(read_audio(path, 16000), T.Resample(rate, 16000)(wave))


def test_odd_rate_keeps_the_pitch(tmp_path):
    path = tmp_path / "odd.wav"
    sf.write(path, tone(1000, 0.5, 8009), 8009)
    wave = read_audio(path, 16000)
    assert abs(len(wave) - round(0.5 * 16000)) <= 2
    spectrum = torch.fft.rfft(wave * torch.hann_window(len(wave)))
    peak_hz = spectrum.abs().argmax().item() * 16000 / len(wave)
    assert abs(peak_hz - 1000) <= 16000 / len(wave)  # within one FFT bin


# ------------------------------------------------------------------------------ decompression bombs


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grey PNG of width × height black pixels, a few kB on disk (written row by row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding_of(monkeypatch):
    """Files whose pixels must never be decoded: ImageFile.load fails the test for them."""
    guarded: set[str] = set()
    load = ImageFile.ImageFile.load

    def guarded_load(self):
        assert str(getattr(self, "filename", "")) not in guarded, f"decoded {self.filename}"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    return guarded


def test_oversized_images_are_skipped_from_their_header(tmp_path, caplog, no_decoding_of):
    write_image_tree(tmp_path / "pets", per_class=3)
    bomb = huge_png(tmp_path / "pets" / "dog" / "bomb.png", 12000, 12000)  # 144 MP in a few kB
    assert bomb.stat().st_size < 100_000
    no_decoding_of.add(str(bomb))
    caplog.set_level(logging.WARNING)
    dm = ImageFolderDataModule(tmp_path / "pets", image_size=8, num_workers=0)  # default max_pixels: 50 MP
    dm.setup("fit")
    assert all(p != bomb for s in (dm.train_set, dm.val_set, dm.test_set) for p, _ in s.items)
    assert caplog.text.count("max_pixels=50000000") == 1 and "skipped 1 image(s) with more than" in caplog.text
    assert "skipped 2 unreadable" in caplog.text and str(bomb) in caplog.text  # the bomb is not "unreadable"
    # replaced after setup: refused from the header in the loader too
    items = ImageFiles([(bomb, 0)], "RGB", lambda image: image)
    with pytest.raises(DataFileError, match=r"bomb.png has 12000 × 12000 pixels, more than task.datamodule.max_pix"):
        items[0]


def test_nothing_left_but_oversized_images_is_an_error(tmp_path, no_decoding_of):
    write_image_tree(tmp_path / "pets", per_class=2)
    for old in (tmp_path / "pets" / "fox").iterdir():
        old.unlink()
    for i in range(2):
        no_decoding_of.add(str(huge_png(tmp_path / "pets" / "fox" / f"{i}.png", 64, 64)))
    with pytest.raises(
        DataFileError,
        match=r"class folder .*fox has no readable files.*; 2 image\(s\) over "
        r"task.datamodule.max_pixels=1000 were skipped",
    ):
        ImageFolderDataModule(tmp_path / "pets", max_pixels=1000).setup("fit")
    with pytest.raises(ConfigError, match="max_pixels"):
        ImageFolderDataModule(tmp_path / "pets", max_pixels=0)


def test_pillow_bomb_limits_are_handled_like_ours(tmp_path, monkeypatch, caplog, no_decoding_of):
    """Pillow warns over Image.MAX_IMAGE_PIXELS and raises over twice that: neither escapes, both
    count as oversized (here with Pillow's limit lowered to 1000 pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    write_image_tree(tmp_path / "pets", per_class=4)
    warned = huge_png(tmp_path / "pets" / "cat" / "warned.png", 40, 40)  # 1600: Pillow warns
    refused = huge_png(tmp_path / "pets" / "dog" / "refused.png", 50, 50)  # 2500: DecompressionBombError
    no_decoding_of.update({str(warned), str(refused)})
    caplog.set_level(logging.WARNING)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        dm = ImageFolderDataModule(tmp_path / "pets", image_size=8, max_pixels=1000, num_workers=0)
        dm.setup("fit")
    assert "skipped 2 image(s) with more than task.datamodule.max_pixels=1000" in caplog.text
    with pytest.raises(ConfigError, match="max_pixels=5000.*Pillow"):
        ImageFolderDataModule(tmp_path / "pets", max_pixels=5000)


# ------------------------------------------------------------------------------- text paths


def finishes(function, seconds: float = 5.0):
    """Run ``function`` in a daemon thread; return what it raised. Fails if it has not ended in ``seconds``
    (a blocked open of a FIFO would hang the test otherwise)."""
    outcome: list = []

    def run():
        try:
            function()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still running after {seconds} s (blocked?)"
    return outcome[0]


def test_non_regular_text_paths_are_named_and_never_block(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        cases = {fifo: "a FIFO (named pipe)", Path("/dev/zero"): "a character device", sock_path: "a socket"}
        for path, kind in cases.items():
            error = finishes(lambda path=path: TextFileDataModule(path=str(path), block_size=8).setup())
            assert isinstance(error, DataFileError), error
            assert str(error) == (
                f"text path {path} is {kind}, not a regular file; pass task.path=FILE "
                "(a regular UTF-8 text file, a list of files, or a directory of .txt files)."
            )
    finally:
        server.close()
    # where a dataset expects a file: a directory or a FIFO in its place
    (tmp_path / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    error = finishes(lambda: TinyShakespeareDataModule(data_dir=tmp_path, download=False).setup())
    assert isinstance(error, DataFileError) and "input.txt is a directory, not a regular file" in str(error)
    raw = tmp_path / "wikitext2" / "wikitext-2-raw"
    raw.mkdir(parents=True)
    for name in ("wiki.train.raw", "wiki.valid.raw"):
        (raw / name).write_text("text\n" * 100)
    os.mkfifo(raw / "wiki.test.raw")
    error = finishes(lambda: WikiText2DataModule(data_dir=tmp_path, download=False).setup())
    assert isinstance(error, DataFileError) and "wiki.test.raw is a FIFO (named pipe)" in str(error)


# ---------------------------------------------------------------------------------------- offline


def no_download(*args, **kwargs):
    raise AssertionError("a download was started although the network is unreachable")


@pytest.fixture
def offline(monkeypatch):
    """No network: every connection attempt fails (counted), every download entry point fails the test."""
    import datasets
    import torchaudio.datasets
    import torchvision.datasets
    import torchvision.datasets.utils

    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    monkeypatch.setattr(text_data.urllib.request, "urlopen", no_download)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_download)
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    monkeypatch.setattr(torchaudio.datasets, "SPEECHCOMMANDS", no_download)
    for flag in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_ENDPOINT",
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(flag, raising=False)
    return attempts


DOWNLOADABLE = {
    "wikitext2": (
        lambda d: WikiText2DataModule(data_dir=d),
        "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        "huggingface.co:443",
    ),
    "tinyshakespeare": (
        lambda d: TinyShakespeareDataModule(data_dir=d),
        text_data.TINYSHAKESPEARE_URL,
        "raw.githubusercontent.com:443",
    ),
    "mnist": (lambda d: MNISTDataModule(d), MNISTDataModule.URL, "ossci-datasets.s3.amazonaws.com:443"),
    "cifar10": (lambda d: CIFAR10DataModule(d), CIFAR10DataModule.URL, "www.cs.toronto.edu:443"),
    "speechcommands": (
        lambda d: SpeechCommandsDataModule(d),
        SpeechCommandsDataModule.URL,
        "download.tensorflow.org:80",
    ),
}


@pytest.mark.parametrize("name", sorted(DOWNLOADABLE))
def test_offline_download_fails_fast_with_the_url(tmp_path, offline, name):
    make, url, server = DOWNLOADABLE[name]
    started = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as caught:
        make(tmp_path).prepare_data()
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert "\n" not in message and url in message and f"cannot connect to {server}" in message
    assert str(tmp_path) in message and len(offline) == 1  # one attempt, no retries


def test_urbansound8k_missing_names_its_url_at_once(tmp_path, offline):
    with pytest.raises(DatasetNotFoundError, match="https://urbansounddataset.weebly.com/urbansound8k.html"):
        UrbanSound8KDataModule(data_dir=tmp_path).setup("fit")
    assert offline == []


def test_hub_offline_flag_needs_no_connection_attempt(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="HF_HUB_OFFLINE is set.*wikitext-2-raw-v1.zip"):
        WikiText2DataModule(data_dir=tmp_path).prepare_data()
    assert offline == []


def test_a_silent_network_costs_one_short_timeout(monkeypatch):
    """A connection attempt that never answers (a firewall dropping packets) ends after the probe timeout."""
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: time.sleep(30))
    monkeypatch.setattr(common, "PROBE_TIMEOUT_S", 0.3)
    started = time.monotonic()
    reason = common.unreachable("https://example.org/file.zip")
    assert time.monotonic() - started < 2 and reason == "cannot connect to example.org:443 (no answer within 0.3 s)"
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: (_ for _ in ()).throw(OSError(address)))
    assert "proxy.internal:3128" in common.unreachable("https://example.org/file.zip")
