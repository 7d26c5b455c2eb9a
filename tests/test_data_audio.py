"""Audio tasks: the real loading code on tiny datasets in each dataset's on-disk format."""

from __future__ import annotations

import logging

import pytest
import torch
from fixtures_vision_audio import (
    URBAN_CLASSES,
    check_classification_task,
    check_forward_backward,
    compose_task,
    first_batch,
    linear_factory,
    train_for,
    write_audio_tree,
    write_speech_commands,
    write_urbansound8k,
)

from astraora.data.audio import (
    AudioFolderDataModule,
    Frontend,
    SpeechCommandsDataModule,
    SyntheticAudioDataModule,
    UrbanSound8KDataModule,
    read_audio,
)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError
from astraora.models.audio import EcapaTDNN


def tiny_model(**model_kwargs) -> EcapaTDNN:
    return EcapaTDNN(linear_factory, channels=8, embedding_dim=6, attention_channels=4, **model_kwargs)


def paths(dataset) -> list[str]:
    return [str(p) for p in dataset.paths]


# ---------------------------------------------------------------------------------- decoding, features


def test_read_audio_downmixes_and_resamples(tmp_path):
    files = write_audio_tree(tmp_path)
    low_rate, stereo = files["odd"]
    assert read_audio(low_rate, 16000).shape == (16000,)  # 1 s at 8 kHz
    assert read_audio(stereo, 16000).shape == (round(1.2 * 16000),)  # 1.2 s stereo at 44.1 kHz
    with pytest.raises(DataFileError, match="broken.wav"):
        read_audio(files["bad"][0], 16000)


def test_frontend_shapes_crop_and_masks():
    frontend = Frontend(sample_rate=16000, duration=1.0, n_mels=40, freq_mask=10, time_mask=20)
    short, long = torch.randn(9000), torch.randn(30000)
    assert frontend(short).shape == (40, 101) and frontend(long).shape == (40, 101)
    assert torch.equal(frontend(long), frontend(long))  # centred crop, no masks
    x = frontend(short)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    torch.manual_seed(0)
    masked = torch.stack([frontend(long, train=True) for _ in range(8)])
    assert (masked == 0).any() and not torch.equal(masked[0], masked[1])


# --------------------------------------------------------------------------------- Speech Commands


def test_speech_commands_official_lists(tmp_path):
    write_speech_commands(tmp_path, words=("yes", "no", "up"), per_word=4)
    dm = SpeechCommandsDataModule(tmp_path, batch_size=2, n_mels=40, download=False, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == ["no", "up", "yes"]
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [6, 3, 3]
    assert all("_nohash_1" in p for p in paths(dm.val_set)) and all("_nohash_2" in p for p in paths(dm.test_set))
    assert not any("_background_noise_" in p for p in paths(dm.train_set))
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (2, 40, 101)
    assert dm.model_kwargs() == {"num_classes": 3, "n_mels": 40}
    check_forward_backward(tiny_model(**dm.model_kwargs()), x, 3)


def test_speech_commands_missing_or_undownloadable_is_one_line(tmp_path, monkeypatch):
    import torchaudio.datasets

    with pytest.raises(DatasetNotFoundError) as caught:
        SpeechCommandsDataModule(tmp_path, download=False).prepare_data()
    assert "\n" not in str(caught.value) and "speech_commands_v0.02" in str(caught.value)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(torchaudio.datasets, "SPEECHCOMMANDS", offline)
    with pytest.raises(DatasetNotFoundError) as caught:
        SpeechCommandsDataModule(tmp_path, download=True).prepare_data()
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)


# ------------------------------------------------------------------------------------ UrbanSound8K


def test_urbansound8k_folds(tmp_path):
    write_urbansound8k(tmp_path)
    dm = UrbanSound8KDataModule(data_dir=tmp_path, batch_size=4, n_mels=32, num_workers=0)
    dm.setup("fit")
    assert dm.classes == URBAN_CLASSES
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [24, 3, 3]
    assert all("/fold9/" in p for p in paths(dm.val_set)) and all("/fold10/" in p for p in paths(dm.test_set))
    assert dm.test_set.labels == [0, 1, 2]
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 32, 401)  # 4 s at a 10 ms hop
    check_forward_backward(tiny_model(**dm.model_kwargs()), x, 3)


def test_urbansound8k_missing_file_skipped_and_missing_dataset(tmp_path, caplog):
    root = write_urbansound8k(tmp_path / "data")
    (root / "audio" / "fold3" / "103-0-0-0.wav").unlink()
    caplog.set_level(logging.WARNING)
    dm = UrbanSound8KDataModule(root=str(root), data_dir=tmp_path / "elsewhere")
    dm.setup("fit")
    assert len(dm.train_set) == 23 and "skipped 1" in caplog.text and "103-0-0-0.wav" in caplog.text
    with pytest.raises(DatasetNotFoundError) as caught:
        UrbanSound8KDataModule(data_dir=tmp_path).setup("fit")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "UrbanSound8K") in message and "task.root" in message


# ------------------------------------------------------------------------------------ audio folders


def test_audio_folder_resamples_and_skips_bad_files(tmp_path, caplog):
    files = write_audio_tree(tmp_path / "sounds", per_class=5)
    caplog.set_level(logging.WARNING)
    dm = AudioFolderDataModule(
        tmp_path / "sounds", seed=0, batch_size=3, n_mels=40, val_fraction=0.25, test_fraction=0.25, num_workers=0
    )
    dm.setup("fit")
    assert dm.classes == ["bird", "siren"] and "skipped 1" in caplog.text and "broken.wav" in caplog.text
    everything = paths(dm.train_set) + paths(dm.val_set) + paths(dm.test_set)
    assert len(everything) == 12 and all(str(p) in everything for p in files["odd"])
    again = AudioFolderDataModule(tmp_path / "sounds", seed=0, val_fraction=0.25, test_fraction=0.25)
    again.setup("fit")
    other = AudioFolderDataModule(tmp_path / "sounds", seed=3, val_fraction=0.25, test_fraction=0.25)
    other.setup("fit")
    assert paths(again.test_set) == paths(dm.test_set) and paths(other.test_set) != paths(dm.test_set)
    for i in range(len(dm.train_set)):  # every file, whatever its rate or channels, gives one shape
        assert dm.train_set[i][0].shape == (40, 101)
    x, _ = first_batch(dm.train_dataloader())
    check_forward_backward(tiny_model(**dm.model_kwargs()), x, 2)


def test_audio_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="task.root"):
        AudioFolderDataModule(None).setup("fit")
    write_audio_tree(tmp_path / "sounds")
    (tmp_path / "sounds" / "silence").mkdir()
    with pytest.raises(DataFileError, match=str(tmp_path / "sounds" / "silence")):
        AudioFolderDataModule(tmp_path / "sounds").setup("fit")


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_audio_is_seeded():
    dm = SyntheticAudioDataModule(seed=0, num_classes=3, clips_per_class=12, batch_size=6)
    dm.setup("fit")
    again = SyntheticAudioDataModule(seed=0, num_classes=3, clips_per_class=12)
    again.setup("fit")
    assert torch.equal(dm.test_set.waves, again.test_set.waves)
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [25, 5, 6]
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (6, 32, 51)  # 0.5 s at 8 kHz, 10 ms hop
    names = []
    model = EcapaTDNN(
        lambda a, b, name: names.append((name, a, b)) or linear_factory(a, b, name),
        channels=8,
        embedding_dim=6,
        attention_channels=4,
        **dm.model_kwargs(),
    )
    assert names == [("embedding.physical", 48, 6)]
    assert isinstance(model.get_submodule("embedding.physical"), torch.nn.Linear)
    check_forward_backward(model, x, 3)


# ------------------------------------------------------------------------------------- task YAMLs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["speechcommands", "urbansound8k", "audio_folder", "synthetic_audio"])
def test_task_yaml_builds_datamodule_and_model(tmp_path, name):
    write_speech_commands(tmp_path)
    write_urbansound8k(tmp_path)
    write_audio_tree(tmp_path / "sounds")
    overrides = {"datamodule": {"batch_size": 2}}
    if name == "audio_folder":
        overrides["root"] = str(tmp_path / "sounds")
    cfg = compose_task(name, tmp_path, overrides)
    check_classification_task(cfg, name, tmp_path)


def test_synthetic_audio_is_learnable():
    torch.manual_seed(0)
    dm = SyntheticAudioDataModule(seed=0)
    dm.setup("fit")
    model = EcapaTDNN(linear_factory, channels=32, embedding_dim=32, attention_channels=32, **dm.model_kwargs())
    train_for(model, dm, epochs=3, lr=1e-3)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dm.val_dataloader())
    assert correct / len(dm.val_set) > 0.8
