"""The ``gradstore`` command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradstore.indexer.demo_corpus import generate_corpus, write_jsonl


def gradstore(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "gradstore.cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"gradstore {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("command", [[], ["index"], ["warmup"], ["info"]])
def test_help_explains_every_option(command):
    result = gradstore(*command, "--help")
    assert result.stdout.startswith("usage: gradstore")
    if command == ["index"]:
        for option in ("--corpus", "--model", "--checkpoint", "--run", "--gradient-type", "--proj-dim",
                       "--on-bad-record", "--max-tokens-per-batch", "--shard-size", "--index"):
            assert option in result.stdout


def test_no_command_prints_help_and_fails():
    result = gradstore(check=False)
    assert result.returncode == 2 and "commands" in result.stdout


def test_warmup_then_index_run_then_info(tmp_path, tiny_model_dirs):
    corpus = write_jsonl(generate_corpus(80, seed=3), tmp_path / "pool.jsonl")
    run = tmp_path / "run"
    out = gradstore("warmup", "--corpus", corpus, "--model", tiny_model_dirs["llama"], "--out", run,
                    "--fraction", "0.5", "--epochs", "2", "--learning-rate", "1e-3", "--lora-r", "4",
                    "--lora-alpha", "8", "--batch-size", "8", "--max-length", "64", "--no-progress")
    assert "2 checkpoints" in out.stdout
    store = tmp_path / "pool.gradstore"
    out = gradstore("index", "--corpus", corpus, "--model", tiny_model_dirs["llama"], "--run", run,
                    "--out", store, "--proj-dim", "512", "--max-length", "64", "--device", "cpu", "--no-progress")
    assert "examples      80" in out.stdout
    info = json.loads(gradstore("info", store, "--json").stdout)
    run_info = json.loads((run / "warmup_run.json").read_text())
    assert [c["name"] for c in info["checkpoints"]] == run_info["checkpoints"]
    lrs = run_info["average_learning_rates"]
    assert [c["weight"] for c in info["checkpoints"]] == pytest.approx([lr / sum(lrs) for lr in lrs])
    assert info["gradient_type"] == "adam" and info["counts"]["examples"] == 80
    summary = gradstore("info", store, "--verify").stdout
    assert "checksums     ok" in summary and "epoch-2" in summary


def test_missing_store_is_one_clear_line(tmp_path):
    result = gradstore("info", tmp_path / "nowhere", check=False)
    assert result.returncode == 1
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_help_gives_each_default_once():
    import argparse

    from gradstore.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subcommands.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._expand_help(action) if action.help else ""
            assert text.count("(default") <= 1, f"gradstore {name} {action.option_strings}: {text!r}"
            assert "(default: None)" not in text and "(default: False)" not in text, (name, action.option_strings)
    index_help = gradstore("index", "--help").stdout
    assert index_help.count("(default: PEFT's for the model)") == 1 and "(default: None)" not in index_help
    assert "(default: 8192)" in index_help  # a value default is still shown
    assert "on CUDA" in index_help and "on CPU" in index_help  # the device-aware batch limits


def test_missing_extra_is_named(tmp_path, monkeypatch, capsys):
    from gradstore.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails as when it is not installed
    assert main(["serve", "--root", str(tmp_path), "--no-auth"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("gradstore serve: missing dependency 'uvicorn' (uvicorn, from the 'cpu' or 'gpu' extra)")
    assert "pip install 'gradstore[cpu]'" in message and "incomplete" not in message


def test_missing_faiss_names_both_faiss_extras():
    from gradstore.cli import missing_module_message

    message = missing_module_message("index", "faiss")
    assert "faiss-cpu or faiss-gpu" in message and "'cpu' or 'gpu' extra" in message
    assert "pip install 'gradstore[datasets]'" in missing_module_message("index", "datasets")
    assert "not one of gradstore's own requirements" in missing_module_message("index", "no_such_module")


def test_missing_gradstore_module_says_the_installation_is_broken(tmp_path, monkeypatch, capsys):
    import gradstore
    from gradstore.cli import main

    monkeypatch.setitem(sys.modules, "gradstore.service.app", None)  # as if the file were absent
    assert main(["serve", "--root", str(tmp_path), "--no-auth"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("gradstore serve: this gradstore installation is incomplete: "
                              "the module 'gradstore.service.app' is missing")
    assert str(Path(gradstore.__file__).parent) in message
    assert "pip install --force-reinstall --no-deps gradstore" in message and "extra" not in message
