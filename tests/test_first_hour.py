"""What a new user meets first: ``make train``'s exact command, its closing summary, a resume
and an evaluation that keep the training log, and the one-command pipeline with its report."""

from __future__ import annotations

import csv
import json
import re
import shlex

import pytest
from helpers import ROOT, run

SHORT = [
    "--trainer.max_steps=4",
    "--trainer.log_every_n_steps=1",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--model.init_args.tokenizer.init_args.channels=16",
    "--data.init_args.num_workers=0",
]


def make_train_command() -> list[str]:
    """The arguments of ``make train``'s train.py call, read from the Makefile itself."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("train: setup") + 1].strip()
    words = shlex.split(recipe)
    assert words[0] == "$(PYTHON)" and words[1] == "train.py", recipe
    return words[1:]


def _csv_steps(path) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_make_train_command_summarises_resumes_and_evaluates_without_losing_logs(tmp_path):
    run_dir = tmp_path / "run"
    base = [*make_train_command(), *SHORT, f"--run_dir={run_dir}"]
    proc = run([*base, "--progress_seconds=0"])
    out = proc.stdout
    # The closing summary: steps, the headline figures and where everything is.
    assert re.search(r"^trained: 4 steps in \d+m\d\ds$", out, re.M), out[-2000:]
    assert re.search(r"^last validation: val/psnr [\d.]+, val/l1 [\d.]+", out, re.M)
    for label, path in (
        ("grid", run_dir / "images" / "recon_0000004.png"),
        ("results", run_dir / "results.json"),
        ("checkpoint", run_dir / "checkpoints" / "last.ckpt"),
    ):
        assert path.is_file() and re.search(rf"^  {label}\s+{re.escape(str(path))}$", out, re.M)
    # Output redirected to a pipe has no progress bar: periodic progress lines stand in for it.
    assert re.search(r"^step \d/4 \| [\d.]+ steps/s", out, re.M)
    assert "will be deleted" not in out + proc.stderr
    steps = _csv_steps(run_dir / "metrics.csv")
    assert steps and max(steps) <= 4

    # Resume: metrics.csv keeps the first run's rows and gains the new ones, no step twice.
    run([*base, "--trainer.max_steps=6", "--ckpt_path=last"])
    resumed = _csv_steps(run_dir / "metrics.csv")
    assert resumed[: len(steps)] == steps and max(resumed) > max(steps)
    assert len(resumed) == len(set(resumed))
    history = json.loads((run_dir / "results.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6]

    # Evaluation: its own folder, labelled with the checkpoint's step; the run is untouched.
    config = (run_dir / "config.yaml").read_text()
    metrics = (run_dir / "metrics.csv").read_text()
    out = run([*base, "--ckpt_path=last", "--evaluate"]).stdout
    eval_dir = run_dir / "eval" / "step0000006"
    entry = json.loads((eval_dir / "results.json").read_text())[-1]
    assert entry["step"] == 6 and entry["run"] == "validate"
    assert (eval_dir / "images" / "recon_0000006.png").is_file()
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "metrics.csv").read_text() == metrics
    assert len(json.loads((run_dir / "results.json").read_text())) == 3
    assert re.search(r"^evaluated: 6 steps", out, re.M)


def test_run_folder_is_named_after_every_config_given():
    from vistok.common.cli import given_config_names

    assert given_config_names(["--config", "generator/ar_cpu_small.yaml"]) == ["ar_cpu_small"]
    assert given_config_names(
        ["--config=tokenizer/wetok.yaml", "--config", "presets/cpu_demo.yaml", "--x=1"]
    ) == ["wetok", "cpu_demo"]


@pytest.mark.slow
def test_pipeline_end_to_end_report_matches_results(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    args = ["-m", "vistok.pipeline", "--preset", "tiny", "--out", str(out)]
    log = run(args, timeout=1800).stdout
    assert "[5/5]" in log and "pipeline done" in log
    report = (out / "report.md").read_text()
    tok = json.loads((out / "tokenizer" / "results.json").read_text())[-1]["metrics"]
    samples = json.loads((out / "samples" / "results.json").read_text())
    for key in ("val/psnr", "val/rfid", "val/pfid"):
        assert f"| `{key}` | {tok[key]:.4g} |" in report, key
    assert f"gFID **{samples['gfid']:.4g}**" in report
    for picture in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / picture).is_file(), picture
    assert (out / "export" / "generator" / "tokenizer" / "model.safetensors").is_file()
    # Started again, every stage is skipped and the report is rewritten from the same files.
    again = run(args).stdout
    assert again.count("skipped") == 5
    assert (out / "report.md").read_text().split("Stage times")[0] == report.split("Stage times")[0]


def test_pipeline_presets_name_existing_configs():
    from vistok.pipeline import PIPELINE_PRESETS

    for preset in PIPELINE_PRESETS.values():
        for arg in preset["tokenizer"] + preset["generator"]:
            if arg.startswith("--config="):
                assert (ROOT / "configs" / arg.split("=", 1)[1]).is_file(), arg


def test_readme_pipeline_block_is_what_the_pipeline_runs(capsys):
    """The README's pipeline commands are the ones ``make demo`` runs (the pipeline test runs
    them end to end), so they cannot drift apart."""
    from vistok.pipeline import main

    readme = (ROOT / "README.md").read_text()
    marker = "<!-- pipeline: python -m vistok.pipeline --dry-run -->\n```bash\n"
    block = readme[readme.index(marker) + len(marker) :].split("```", 1)[0]
    main(["--dry-run"])
    assert block.strip() == capsys.readouterr().out.strip()


@pytest.mark.parametrize("name", ["cpu_small", "tiny"])
def test_pipeline_tokenizer_evaluates_at_its_last_step(name):
    """The report's rFID/pFID come from the evaluation at the tokenizer's last step: that step
    must be a validation step and an evaluation step of the stacked configs."""
    import yaml

    from vistok.pipeline import PIPELINE_PRESETS

    args = ["train.py", *PIPELINE_PRESETS[name]["tokenizer"], "--print_config"]
    config = yaml.safe_load(run(args).stdout)
    trainer = config["trainer"]
    (evaluation,) = [c for c in trainer["callbacks"] if "every_n_steps" in c["init_args"]]
    last = trainer["max_steps"]
    assert last % trainer["val_check_interval"] == 0, trainer["val_check_interval"]
    assert last % evaluation["init_args"]["every_n_steps"] == 0
