"""What a user of the command line sees: one-line errors and no traceback for bad flags, files and pipes; Ctrl-C;
the same flags spelled the same way on every subcommand; estimators from --plugin files and entry points."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from biaslab.cli import main
from biaslab.cli.flags import (
    DEFAULT_ALPHA,
    DEFAULT_KL_SCALE,
    add_common_flags,
    output_dir,
    positive_int,
    probability,
    vocab_size,
)
from biaslab.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]

#: the smallest valid command line of each subcommand (other flags are appended to it); later ones are skipped.
MINIMAL = {
    "table": [],
    "exact": ["--logits", "model.npz"],
    "figures": [],
    "check": [str(ROOT / "examples" / "my_estimators.py") + ":k3", "--placement", "both"],
    "audit": ["--framework", "verl"],
    "llm": [],
}
#: subcommands that must offer --progress/--no-progress (those that exist).
WITH_PROGRESS = ("table", "exact", "figures", "check", "audit", "llm")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def run(*args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "biaslab", *args], capture_output=True, text=True, cwd=ROOT, env=env, **kwargs
    )


def one_line_error(capsys, argv, *needles):
    """``main(argv)`` exits 2 with a one-line message containing ``needles`` and no traceback."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and all(n in last for n in needles), (argv, err)
    return last


# ---------------------------------------------------------------------------------------------- flag types


def test_flag_types():
    assert positive_int("3") == 3 and vocab_size("2") == 2 and probability("0.05") == 0.05
    for kind, bad in ((positive_int, "0"), (positive_int, "-3"), (positive_int, "x"), (vocab_size, "1")):
        with pytest.raises(argparse.ArgumentTypeError):
            kind(bad)
    for bad in ("0", "1", "-0.1", "1.5", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            probability(bad)


def test_add_common_flags(tmp_path):
    p = argparse.ArgumentParser()
    add_common_flags(p, formats=("text", "json", "csv"), seed=True, toy=True, kl_scale=True, alpha=True, out="x")
    args = p.parse_args([])
    assert (args.format, args.progress, args.seed, args.vocab, args.length) == ("text", None, 0, 3, 4)
    assert (args.kl_scale, args.alpha) == (DEFAULT_KL_SCALE, DEFAULT_ALPHA)
    args = p.parse_args(["--no-progress", "--out", str(tmp_path), "--alpha", "0.2", "--format", "csv"])
    assert args.progress is False and args.out == tmp_path and args.alpha == 0.2
    assert p.parse_args(["--progress"]).progress is True
    assert output_dir("") is None
    with pytest.raises(SystemExit):
        p.parse_args(["--vocab", "1"])


@pytest.mark.parametrize("flag,bad", [("--vocab", "0"), ("--vocab", "1"), ("--vocab", "-3"), ("--length", "0"),
                                      ("--length", "-1"), ("--alpha", "0"), ("--alpha", "1"), ("--alpha", "2")])
def test_bad_sizes_and_levels_on_every_subcommand(capsys, flag, bad):
    checked = 0
    for name, p in subparsers().items():
        if flag not in options(p) or name not in MINIMAL:
            continue
        one_line_error(capsys, [name, *MINIMAL[name], flag, bad], flag)
        checked += 1
    assert checked or flag == "--alpha"


def test_logits_npy_and_folders_are_refused(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((1, 3)))
    one_line_error(capsys, ["exact", "--logits", str(tmp_path / "a.npy")], ".npy", "npz")
    one_line_error(capsys, ["exact", "--logits", str(tmp_path)], "folder")


def test_out_is_checked_before_computing(tmp_path, capsys, monkeypatch):
    import biaslab.figures

    def never(*a, **k):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(biaslab.figures, "make_figures", never)
    (tmp_path / "file").write_text("x")
    for name, p in subparsers().items():
        if "--out" not in options(p) or name not in MINIMAL:
            continue
        one_line_error(capsys, [name, *MINIMAL[name], "--out", str(tmp_path / "file")], "--out", "is a file")
        if Path("/proc/self").is_dir():
            one_line_error(capsys, [name, *MINIMAL[name], "--out", "/proc/self/x"], "--out", "writ")


def test_complex_estimator_is_a_clear_error(tmp_path):
    plugin = tmp_path / "cplx.py"
    plugin.write_text(
        "from biaslab import register_estimator\n"
        "register_estimator('cplx', lambda lp, lr: (lp - lr).to(dtype=__import__('torch').complex128))\n"
    )
    r = run("--plugin", str(plugin), "table", "--vocab", "2", "--length", "2", "--estimators", "cplx")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'cplx' returned dtype complex128" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- pipes and Ctrl-C


def test_closed_pipe_is_quiet():
    p = subprocess.Popen(
        [sys.executable, "-m", "biaslab", "table", "--vocab", "2", "--length", "2", "--format", "csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    p.stdout.close()  # the reader is gone before anything is written: `biaslab table | head -0`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert err == "" and p.returncode == 141


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "interrupt.py"  # Ctrl-C arrives while the command runs (here: while a plugin loads)
    plugin.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    r = run("--plugin", str(plugin), "table")
    assert r.returncode == 130 and r.stderr == "biaslab: interrupted\n", r.stderr

    import biaslab.figures

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(biaslab.figures, "make_figures", interrupted)
    assert main(["figures", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "biaslab: interrupted\n"


# ---------------------------------------------------------------------------------------------- consistent flags


def test_help_has_defaults_and_no_backticks():
    top = build_parser().format_help()
    assert "`" not in top and "--plugin" in top
    for name, p in subparsers().items():
        text = p.format_help()
        assert "`" not in text, (name, text)
        for opt, action in options(p).items():
            if opt.startswith("--") and action.default not in (None, False, True, argparse.SUPPRESS, []):
                assert action.help and ("default" in p._get_formatter()._get_help_string(action)), (name, opt)


def test_common_flags_are_spelled_the_same_everywhere():
    subs = subparsers()
    problems = [
        f"{n}: no --progress/--no-progress"
        for n in WITH_PROGRESS
        if n in subs and not {"--progress", "--no-progress"} <= set(options(subs[n]))
    ]
    for name, p in subs.items():
        opts = options(p)
        if "--progress" in opts and not isinstance(opts["--progress"], argparse.BooleanOptionalAction):
            problems.append(f"{name}: --progress is not an argparse.BooleanOptionalAction")
        if "--format" in opts and not {"text", "json"} <= set(opts["--format"].choices):
            problems.append(f"{name}: --format lacks text or json")
        if "--kl-scale" in opts and opts["--kl-scale"].default != DEFAULT_KL_SCALE:
            problems.append(f"{name}: --kl-scale default {opts['--kl-scale'].default}, not {DEFAULT_KL_SCALE}")
        if "--alpha" in opts and opts["--alpha"].default != DEFAULT_ALPHA:
            problems.append(f"{name}: --alpha default {opts['--alpha'].default}, not {DEFAULT_ALPHA}")
        if "--alpha" in opts and opts["--alpha"].type is not probability:
            problems.append(f"{name}: --alpha is not type=biaslab.cli.probability")
    for name in ("table", "exact"):
        assert {"text", "md", "csv", "json"} <= set(options(subs[name])["--format"].choices)
    assert not problems, "\n".join(problems)


def test_progress_flags(tmp_path, capsys):
    assert main(["table", "--vocab", "2", "--length", "2", "--format", "csv", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["table", "--vocab", "2", "--length", "2", "--format", "text", "--progress"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("# Exact KL-gradient table")


# ---------------------------------------------------------------------------------------------- plugins


def test_plugin_file_registers_estimators(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            import torch
            from biaslab import register_estimator

            def my_k3(logp, logp_ref):
                log_r = logp_ref - logp
                return torch.expm1(log_r) - log_r

            register_estimator("my_k3", my_k3)
            """
        )
    )
    r = run("--plugin", str(plugin), "table", "--vocab", "2", "--length", "2", "--estimators", "my_k3,k3",
            "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    mine = {(x["placement"], x["level"], x["credit"]): x["rel_bias"] for x in rows if x["estimator"] == "my_k3"}
    k3 = {(x["placement"], x["level"], x["credit"]): x["rel_bias"] for x in rows if x["estimator"] == "k3"}
    assert mine and mine == pytest.approx(k3, abs=1e-12)
    r = run("table", "--estimators", "my_k3")
    assert r.returncode == 2 and "unknown estimator 'my_k3'" in r.stderr
    r = run("--plugin", str(tmp_path / "nope.py"), "table")
    assert r.returncode == 2 and "nope.py: no such file" in r.stderr and "Traceback" not in r.stderr


def test_entry_point_registers_estimators(tmp_path):
    site = tmp_path / "site"
    (site / "kl_extra").mkdir(parents=True)
    (site / "kl_extra" / "__init__.py").write_text("def half_k1(logp, logp_ref):\n    return 0.5 * (logp - logp_ref)\n")
    dist = site / "kl_extra-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kl-extra\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[biaslab.estimators]\nhalf_k1 = kl_extra:half_k1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = run("table", "--vocab", "2", "--length", "2", "--estimators", "half_k1", "--format", "csv", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 11 and all(line.startswith("half_k1,") for line in lines[1:])
    # a broken entry point is skipped with a warning, never a traceback
    (dist / "entry_points.txt").write_text("[biaslab.estimators]\nbroken = kl_extra:missing\n")
    r = run("table", "--vocab", "2", "--length", "2", "--format", "csv", env=env)
    assert r.returncode == 0 and "warning: skipped entry point 'broken'" in r.stderr and "Traceback" not in r.stderr


def test_version_and_usage():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("biaslab ")
    r = run()
    assert r.returncode == 2 and "usage: biaslab" in r.stderr
