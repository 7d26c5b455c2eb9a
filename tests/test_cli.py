"""The command line (astraora.cli): a refused argument stops in one line with exit code 2, before torch
is imported and before Hydra makes a run or sweep folder; multiruns, launchers and a resume from the
command line. The config rules themselves: tests/test_preflight.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli, single_class
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from astraora import cli
from astraora.paths import CONFIG_DIR
from astraora.report.compare import main as compare_main

FAST = ["debug=fast", "task.model.hidden=16", "surrogate.rank=4"]
STEPS = ["debug=fast", "callbacks.diagnostics.every_n_steps=1"]


def refusal(capsys, argv: list[str], monkeypatch) -> str:
    """``python train.py ARGV`` in this process, up to its refusal: the one stderr line."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def one_line_exit_2(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


@pytest.mark.slow
def test_the_command_line_starts_without_torch_and_the_run_without_the_command_line():
    """The command line's checks import no torch (a refused group option: no start-up at all), and the
    run driver does not import the command line back."""
    checked = imported_by(
        "from astraora import cli\n"
        "try:\n"
        "    cli.check_group_overrides(['device=nonesuch'])\n"
        "except SystemExit:\n"
        "    pass"
    )
    assert "astraora.cli" in checked and "torch" not in checked and "astraora.train" not in checked
    driver = imported_by("import astraora.train")
    assert "torch" in driver and "astraora.cli" not in driver


def test_secret_keys_are_refused_before_hydra_writes(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["+device.token=SUPERSECRET1"],
        ["device.token=SUPERSECRET1"],
        ["-m", "+device.api_secret=SUPERSECRET1"],
        ["hydra.job.env_set.DB_PASSWORD=SUPERSECRET1"],
    ):
        line = refusal(capsys, argv, monkeypatch)
        assert "SUPERSECRET1" not in line and "$ASTRAORA_DEVICE_TOKEN or device.token_file" in line
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the other checks are off then; this one is not
    refusal(capsys, ["+device.token=SUPERSECRET1"], monkeypatch)
    assert not (tmp_path / "outputs").exists()
    cli.check_secrets(["device.token_file=/run/secrets/t", "task.generate.max_new_tokens=5", "task.tokenizer=byte"])


def test_launcher_accelerator_and_multirun_jobs_are_checked_before_hydra(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert "add -m" in refusal(capsys, ["launcher=slurm"], monkeypatch)
    monkeypatch.setattr(cli.shutil, "which", lambda command: None)
    assert "needs SLURM's sbatch and srun" in refusal(capsys, ["-m", "launcher=slurm", "seed=1,2"], monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no CUDA GPU" in refusal(capsys, ["trainer=gpu"], monkeypatch)
    assert "torch sees no CUDA GPU" in refusal(capsys, ["-m", "trainer=gpu", "seed=1,2"], monkeypatch)
    line = refusal(capsys, ["-m", "seed=1,2", "task.datamodule.batch_size=64,0"], monkeypatch)
    assert "task.datamodule.batch_size=0 is not allowed" in line
    assert not (tmp_path / "outputs").exists()


def test_sweep_jobs_lists_what_the_basic_sweeper_runs():
    assert cli.sweep_jobs(["a=1", "b=2,3", "c=range(0,2)"]) == [
        ["a=1", "b=2", "c=0"],
        ["a=1", "b=2", "c=1"],
        ["a=1", "b=3", "c=0"],
        ["a=1", "b=3", "c=1"],
    ]
    many = cli.sweep_jobs([f"k{i}=1,2" for i in range(8)])  # 256 combinations: each value once instead
    assert len(many) == 16 and ["k0=2", *(f"k{i}=1" for i in range(1, 8))] in many


def test_an_empty_sweep_folder_is_discarded(tmp_path):
    empty, used = tmp_path / "empty", tmp_path / "used"
    for sweep in (empty, used):
        (sweep / "0").mkdir(parents=True)
        (sweep / "multirun.yaml").write_text("{}\n")
        cli.DiscardEmptySweep().on_multirun_start(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    (used / "0" / "summary.json").write_text("{}\n")
    cli.discard_empty_sweeps()
    assert not empty.exists() and (used / "0" / "summary.json").exists()


@pytest.mark.slow
def test_cli_refusals_leave_no_run_folder(tmp_path):
    """A key the config lacks, a one-class folder, a truncated checkpoint: one line, exit 2, no
    outputs/runs/<run> (bad config values: test_reliability.py)."""
    root = single_class(tmp_path / "images", "image")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    for args, needle in [
        (["debug=fast", "task.model.hiden=16"], "task.model.hiden"),
        (["debug=fast", "task=image_folder", f"task.root={root}"], "has 1 class folder"),
        ([*FAST, f"resume={bad}"], "is not a readable checkpoint"),
    ]:
        one_line_exit_2(run_cli(args, cwd=tmp_path), needle)
    assert not list((tmp_path / "outputs" / "runs").glob("*"))


@pytest.mark.slow
def test_cli_multirun_refused_in_its_first_job_leaves_no_sweep_folder(tmp_path):
    """A refusal only the data can give (run(), inside Hydra's multirun): one line, exit 2, and no
    outputs/multirun/<sweep> with a lone multirun.yaml (the earlier checks: the tests above)."""
    args = ["-m", "debug=fast", "task=image_folder", f"task.root={tmp_path / 'missing'}", "seed=1,2"]
    result = run_cli(args, cwd=tmp_path)
    one_line_exit_2(result, "is not a folder")
    assert not list((tmp_path / "outputs" / "multirun").glob("*"))


@pytest.mark.slow
def test_cli_resume_continues_in_its_run_and_train_log_holds_the_console(tmp_path):
    """A run (started in-process, as the command line would lay it out) resumed from the command line:
    no second folder, and the console's lines, the resume's among them, land in its train.log."""
    from conftest import compose_config

    from astraora.train import run

    run_dir = tmp_path / "outputs" / "runs" / "first"
    run(compose_config([*FAST, "trainer.max_epochs=1"], run_dir))
    resumed = run_cli([*FAST, "trainer.max_epochs=2", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == ["first"]  # no second folder
    log = (run_dir / "train.log").read_text()
    report = resumed.stdout.strip().splitlines()[-1]
    assert report.startswith("digits / mzi (zo+sm): test/acc") and report in log
    assert "resuming from" in log and "`Trainer.fit` stopped: `max_epochs=2`" in log
    assert "`Trainer.fit` stopped" in resumed.stdout and "resuming from" in resumed.stdout
    for noise in ("💡", "Tip:", "LeafSpec", "anonymous"):
        assert noise not in resumed.stdout + resumed.stderr + log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2


@pytest.mark.slow
def test_multirun_and_compare(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *STEPS, "device=digital,slm", "surrogate.rank=4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["device"] for p in summaries} == {"digital", "slm"}
    assert len({p.parent for p in summaries}) == 2  # separate output dirs
    out = tmp_path / "report"
    assert compare_main([str(sweep), "--out", str(out)]) == 0  # scripts/compare.py's main, in-process
    printed = capsys.readouterr().out
    assert "| slm" in printed and "| digital" in printed
    assert (out / "comparison.csv").is_file() and list(out.glob("*.png"))


@pytest.mark.slow
def test_optuna_search_and_joblib_launcher_run(tmp_path):
    """One sweep checks both presets: the Optuna sweeper launches its 2 trials as one batch through
    the joblib launcher (one worker: loky's worker processes would add a start-up per worker)."""
    sweep = tmp_path / "optuna"
    result = run_cli(
        [
            "-m",
            "hparams_search=optuna",
            "launcher=joblib",
            "hydra.launcher.n_jobs=1",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *STEPS,
            "device=slm",
            "task.model.hidden=24",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )  # ranks up to 20
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/summary.json"))) == 2
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
    assert "Joblib.Parallel" in result.stdout + result.stderr and "launching 2 jobs" in result.stdout + result.stderr


def test_slurm_launcher_preset_composes():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["launcher=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.trainer.accelerator == "gpu"
