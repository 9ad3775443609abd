"""Indexing under faults and across processes, each checked against one uninterrupted run.

SIGKILL at chosen points of the compute, of a shard write and of finalisation, then resume; a
full disk (a file size limit) and a read-only output folder; torchrun with 2 and 3 CPU ranks.
Real subprocesses, real signals, real files. Every process runs with one thread, as torchrun
gives each rank one, so that all of them compute the same bits.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_job import cli_index_command, store_files

from conftest import ONE_THREAD, kill_at

from gradstore.datastore import PENDING_MANIFEST, Datastore
from gradstore.indexer.errors import JobError
from gradstore.indexer.job import rank_device

# Manifest fields that record when and how fast a run went, and so differ between equal stores.
TIME_FIELDS = ("created_at", "updated_at")
JOB_TIME_FIELDS = ("compute_seconds", "examples_per_second", "tokens_per_second")

def index_command(tiny_model_dirs, service_corpus, out: Path, *extra) -> list[str]:
    """`gradstore index` of the shared 40-example corpus into 10 shards with the tiny GPT-2, with an
    approximate index (exact stores have none, and an index is a finalisation step to fault)."""
    return cli_index_command(tiny_model_dirs["gpt2"], service_corpus[0], out, "--index", "sq16", *extra)


def comparable_manifest(store: Path) -> dict:
    """The manifest without the fields that record time and throughput."""
    manifest = json.loads((store / "manifest.json").read_text())
    for name in TIME_FIELDS:
        manifest.pop(name)
    for name in JOB_TIME_FIELDS:
        manifest["job"].pop(name)
    for entry in manifest["history"]:
        entry.pop("at")
    return manifest


def assert_same_store(store: Path, reference: Path) -> None:
    """Data files byte for byte (index included), manifests but for time fields."""
    files, expected = store_files(store), store_files(reference)
    assert sorted(files) == sorted(expected)
    assert [name for name in files if files[name] != expected[name]] == []
    assert comparable_manifest(store) == comparable_manifest(reference)


def every_byte(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    """The CLI's single ``error:`` line; a traceback fails the test."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs, service_corpus) -> Path:
    """One uninterrupted single-process store."""
    out = tmp_path_factory.mktemp("reference") / "store"
    subprocess.run(index_command(tiny_model_dirs, service_corpus, out), check=True, capture_output=True,
                   env=ONE_THREAD)
    return out


@pytest.mark.slow
def test_sigkill_at_each_phase_then_resume_gives_identical_store(tmp_path, tiny_model_dirs, service_corpus,
                                                                  reference):
    out = tmp_path / "store"
    command = index_command(tiny_model_dirs, service_corpus, out)
    work = tmp_path / ".store.partial"
    shards = work / "_shards"

    def done_shards() -> set[int]:
        return {int(p.stem.split("-")[1]) for p in shards.glob("part-*.done")}

    # Compute: killed before its fifth batch, some shards done, others not.
    kill_at(command, "ExampleFeaturizer", "_batch_once", "", 5, "before")
    assert 0 < len(done_shards()) < 10

    # A shard write (of the resumed run): its examples file is in place, its features and done
    # marker are not.
    kill_at(command, "files", "move_into_place", "/features/", 2, "before")
    written = {int(p.stem.split("-")[1]) for p in (work / "examples").glob("part-*.parquet")}
    half_written = written - done_shards()
    assert len(half_written) == 1
    assert not (work / "features" / "fresh" / f"part-{half_written.pop():05d}.npy").exists()

    # Finalisation: right after the index is in place (before its state is recorded) ...
    kill_at(command, "files", "move_into_place", "v000001.faiss", 1, "after")
    assert done_shards() == set(range(10)) and (work / "index" / "v000001.faiss").exists()
    assert not (work / "manifest.json").exists()
    # ... right after the pending manifest is written (before the bookkeeping is dropped) ...
    kill_at(command, "files", "move_into_place", PENDING_MANIFEST, 1, "after")
    assert (work / PENDING_MANIFEST).exists() and shards.exists()
    # ... and with the manifest committed, just before publication.
    kill_at(command, "job", "publish_store", "", 1, "before")
    assert (work / "manifest.json").exists() and not shards.exists()
    assert not out.exists()

    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    assert not work.exists()
    assert_same_store(out, reference)
    Datastore.open(out, verify=True)


def limit_file_size(limit: int):
    """For ``preexec_fn``: no file may grow past ``limit`` bytes, and a write that would makes the
    system call fail with EFBIG (instead of the default SIGXFSZ kill), as a full disk does with
    ENOSPC."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("limit, failing_file", [
    (2048, Path(".store.partial", "examples", "part-00000.parquet")),  # the first shard write
    (16384, Path(".store.partial", "index", "v000001.faiss")),          # finalisation (faiss)
])
def test_full_disk_is_one_clear_error_and_leaves_earlier_store(tmp_path, tiny_model_dirs, service_corpus,
                                                               reference, limit, failing_file):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    earlier = every_byte(out)
    result = subprocess.run(index_command(tiny_model_dirs, service_corpus, out, "--overwrite"), capture_output=True,
                            text=True, env=ONE_THREAD, preexec_fn=limit_file_size(limit))
    assert result.returncode == 1
    assert one_error_line(result.stderr) == f"error: {tmp_path / failing_file}: cannot write: File too large"
    assert every_byte(out) == earlier
    assert not list((tmp_path / ".store.partial").rglob("*.tmp"))  # no half-written temporary file left


@pytest.mark.slow
def test_read_only_output_folder_is_refused_before_any_work(tmp_path, tiny_model_dirs, service_corpus, reference):
    folder = tmp_path / "stores"
    out = folder / "store"
    shutil.copytree(reference, out)
    earlier = every_byte(folder)
    progress = tmp_path / "progress.json"
    command = index_command(tiny_model_dirs, service_corpus, out, "--overwrite", "--progress-file", str(progress))
    if os.geteuid() == 0:  # root writes anywhere unless it gives up the capability to
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a folder read-only to the job")
        command = ["setpriv", "--bounding-set", "-dac_override,-fowner", "--", *command]
    folder.chmod(0o555)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1
    error = one_error_line(result.stderr)
    assert error.startswith(f"error: {folder}: cannot write here (Permission denied)")
    assert not progress.exists()  # refused before the job started preparing
    assert every_byte(folder) == earlier


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_torchrun_ranks_match_one_process(tmp_path, tiny_model_dirs, service_corpus, reference, ranks):
    out = tmp_path / "store"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    result = subprocess.run(torchrun + index_command(tiny_model_dirs, service_corpus, out)[1:], capture_output=True,
                            text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    # A shard is computed the same way whichever rank takes it: the stores are byte-identical.
    assert Datastore.open(out).manifest.job["world_size"] == ranks
    manifests = [comparable_manifest(store) for store in (out, reference)]
    for manifest in manifests:
        manifest["job"].pop("world_size")
    assert store_files(out) == store_files(reference) and manifests[0] == manifests[1]


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # a named device is shared
    visible = torch.cuda.device_count()
    if visible > 1:
        assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    else:
        with pytest.raises(JobError, match=f"LOCAL_RANK 1 has no GPU of its own: {visible} visible"):
            rank_device(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_cuda_outside_torchrun_is_the_current_gpu_by_index(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device(torch.device("cuda")) == torch.device("cuda", torch.cuda.current_device())
