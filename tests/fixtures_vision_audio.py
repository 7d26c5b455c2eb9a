"""Writers of tiny datasets in each dataset's REAL on-disk format, for the vision and audio tests."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hydra.utils import instantiate
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as the official CIFAR-10 batches are: by Python 2's cPickle, protocol 2, where
    strings are byte strings (SHORT_BINSTRING / BINSTRING) and a numpy array is rebuilt through the
    globals ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``. Supports
    dict, list, str (latin-1), int and 2-D uint8 arrays: what a batch holds."""
    memo = [0]

    def put() -> bytes:
        memo[0] += 1
        return b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + memo[0].to_bytes(4, "little")

    def string(value: bytes) -> bytes:
        head = b"U" + bytes([len(value)]) if len(value) < 256 else b"T" + len(value).to_bytes(4, "little")
        return head + value + put()

    def integer(value: int) -> bytes:
        if 0 <= value < 256:
            return b"K" + bytes([value])
        if 0 <= value < 65536:
            return b"M" + value.to_bytes(2, "little")
        return b"J" + value.to_bytes(4, "little", signed=True)

    def dump(value) -> bytes:
        if isinstance(value, dict):
            return b"}" + put() + b"(" + b"".join(dump(k) + dump(v) for k, v in value.items()) + b"u"
        if isinstance(value, list):
            return b"]" + put() + b"(" + b"".join(dump(v) for v in value) + b"e"
        if isinstance(value, str):
            return string(value.encode("latin-1"))
        if isinstance(value, int):
            return integer(value)
        assert isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
        dtype = (
            b"cnumpy\ndtype\n"
            + put()
            + string(b"u1")
            + b"K\x00K\x01\x87R"
            + put()
            + b"(K\x03"
            + string(b"|")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        return (
            b"cnumpy.core.multiarray\n_reconstruct\n"
            + put()
            + b"cnumpy\nndarray\n"
            + put()
            + b"K\x00\x85"
            + string(b"b")
            + b"\x87R"
            + put()
            + b"(K\x01"
            + integer(value.shape[0])
            + integer(value.shape[1])
            + b"\x86"
            + dtype
            + b"\x89"
            + string(value.tobytes())
            + b"tb"
        )

    return b"\x80\x02" + dump(obj) + b"."


def write_cifar10(data_dir: Path, per_batch: int = 4, test: int = 6) -> Path:
    """``data_dir/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta, pickled as the
    official files are (:func:`py2_pickle`; rows of 3072 bytes: the red plane, then green, then blue).
    Not the official files, so their MD5s differ: load them with ``verify=False``."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(data_dir: Path, train: int = 24, test: int = 8, gz: bool = False) -> Path:
    """``data_dir/MNIST/raw`` with the four IDX files, extracted (as torchvision leaves them) or gzipped."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{prefix}-labels-idx1-ubyte": np.arange(n, dtype=np.uint8) % 10,
        }
        for name, array in files.items():
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return raw


def tone(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """A sine of ``freq`` Hz: ``(samples,)`` or ``(samples, channels)`` float32."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_speech_commands(data_dir: Path, words=("yes", "no", "up"), per_word: int = 4) -> Path:
    """``data_dir/SpeechCommands/speech_commands_v0.02/<word>/<speaker>_nohash_<n>.wav`` (16 kHz, ≤ 1 s),
    a ``_background_noise_`` folder, and the official-style validation_list.txt / testing_list.txt
    (utterance 1 of each word in validation, utterance 2 in testing)."""
    folder = data_dir / "SpeechCommands" / "speech_commands_v0.02"
    val, test = [], []
    for k, word in enumerate(words):
        (folder / word).mkdir(parents=True)
        for i in range(per_word):
            name = f"{word}/spk{i:04x}_nohash_{i}.wav"
            sf.write(folder / name, tone(300 + 200 * k, 0.6 + 0.1 * i, 16000), 16000)
            (val if i == 1 else test if i == 2 else []).append(name)
    (folder / "_background_noise_").mkdir()
    sf.write(folder / "_background_noise_" / "white_noise.wav", np.zeros(16000, np.float32), 16000)
    (folder / "validation_list.txt").write_text("\n".join(val) + "\n")
    (folder / "testing_list.txt").write_text("\n".join(test) + "\n")
    return folder


URBAN_CLASSES = ["air_conditioner", "car_horn", "children_playing"]


def write_urbansound8k(data_dir: Path) -> Path:
    """``data_dir/UrbanSound8K`` with audio/fold1..fold10 and metadata/UrbanSound8K.csv: one clip per
    fold and class; rates 22.05/44.1 kHz, some stereo, lengths 1–5 s."""
    root = data_dir / "UrbanSound8K"
    (root / "metadata").mkdir(parents=True)
    rows = []
    for fold in range(1, 11):
        (root / "audio" / f"fold{fold}").mkdir(parents=True)
        for class_id, name in enumerate(URBAN_CLASSES):
            file = f"{100 + fold}-{class_id}-0-0.wav"
            rate = 22050 if fold % 2 else 44100
            wave = tone(200 * (class_id + 1), 1.0 + (fold % 5), rate, channels=2 if class_id == 1 else 1)
            sf.write(root / "audio" / f"fold{fold}" / file, wave, rate)
            rows.append(
                {
                    "slice_file_name": file,
                    "fsID": 100 + fold,
                    "start": 0.0,
                    "end": 1.0,
                    "salience": 1,
                    "fold": fold,
                    "classID": class_id,
                    "class": name,
                }
            )
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_image_tree(root: Path, per_class: int = 6) -> dict[str, list[Path]]:
    """``root/<class>/<image>`` with RGB PNGs and JPEGs, plus an odd-size grayscale image, a file of
    garbage bytes named .jpg and a truncated PNG. Returns the odd and the bad files."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    grey = root / "cat" / "grey_odd.png"
    Image.fromarray(rng.integers(0, 256, (13, 37), dtype=np.uint8), mode="L").save(grey)
    garbage = root / "dog" / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    truncated = root / "fox" / "truncated.png"
    full = root / "fox" / "1.png"
    truncated.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (root / "fox" / "notes.txt").write_text("not an image extension: ignored")
    return {"odd": [grey], "bad": [garbage, truncated]}


def write_audio_tree(root: Path, per_class: int = 5) -> dict[str, list[Path]]:
    """``root/<class>/<file>`` with 16 kHz mono WAVs, plus an 8 kHz FLAC, a 44.1 kHz stereo WAV and an
    unreadable .wav. Returns the odd and the bad files."""
    for k, name in enumerate(("bird", "siren")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            sf.write(root / name / f"{i}.wav", tone(400 * (k + 1), 0.5 + 0.2 * i, 16000), 16000)
    other_rate = root / "bird" / "low_rate.flac"
    sf.write(other_rate, tone(400, 1.0, 8000), 8000)
    stereo = root / "siren" / "stereo.wav"
    sf.write(stereo, tone(800, 1.2, 44100, channels=2), 44100)
    broken = root / "siren" / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return {"odd": [other_rate, stereo], "bad": [broken]}


def compose_task(name: str, data_dir: Path, overrides: dict | None = None):
    """``conf/task/<name>.yaml`` mounted at ``task``, with ``paths.data_dir`` and ``seed=0`` filled in
    and ``overrides`` (a nested dict of task keys) merged on top; resolved."""
    from omegaconf import OmegaConf

    task = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "task" / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"data_dir": str(data_dir)}, "seed": 0}, {"task": task}, {"task": overrides or {}})
    OmegaConf.resolve(cfg)
    return cfg


# ------------------------------------------------------------------------- shared checks


def linear_factory(d_in, d_out, name):
    """A digital stand-in for the physical layer."""
    return torch.nn.Linear(d_in, d_out)


def check_forward_backward(model: torch.nn.Module, x: torch.Tensor, num_classes: int) -> None:
    logits = model(x)
    assert logits.shape == (len(x), num_classes)
    torch.nn.functional.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.parameters())


def first_batch(loader):
    """The first (x, y) of a loader, checked to be a float batch with int64 labels."""
    x, y = next(iter(loader))
    assert y.dtype == torch.int64 and y.ndim == 1 and len(x) == len(y) and x.dtype == torch.float32
    return x, y


def check_classification_task(cfg, name: str, data_dir: Path) -> None:
    """A composed classification task: its keys, its DataModule on ``data_dir`` and a forward/backward
    of its backbone on the first training batch."""
    assert cfg.task.name == name and cfg.task.kind == "classification" and cfg.task.max_epochs > 0
    assert {"name", "lr", "weight_decay"} <= set(cfg.task.optimizer)
    dm = instantiate(cfg.task.datamodule)
    assert dm.seed == 0 and str(dm.data_dir) == str(data_dir)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(cfg.task.model, layer_factory=linear_factory, **dm.model_kwargs())
    x, _ = first_batch(dm.train_dataloader())
    check_forward_backward(model, x, dm.model_kwargs()["num_classes"])


def train_for(model: torch.nn.Module, dm, epochs: int, lr: float) -> torch.nn.Module:
    """Plain Adam + cross-entropy over ``dm``'s training loader; returns the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()
