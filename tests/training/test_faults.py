"""What a training job guarantees when things go wrong (docs/training.md, "Faults: what the job guarantees").

Resuming at or past --steps trains nothing and deletes nothing; pruning never leaves only damaged
checkpoints; one job per --out-dir; spawned workers die with their launcher; equal CPU runs give
equal bits whatever the thread count. Runs are single-process and in this process unless a test
is about processes.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.training import checkpoint
from cs336_systems.training import command as train
from cs336_systems.training.config import config_from_args

pytestmark = pytest.mark.usefixtures("one_thread")  # runs in this process: one thread, like each rank
COMMON = ["--nproc", "1", "--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--log-every", "1",
          "--eval-every", "0", "--lr", "1e-2", "--no-progress"]
TESTS = Path(__file__).resolve().parent.parent


def parse(out_dir: Path, *flags: str):
    return config_from_args(cli.build_parser().parse_args(["train", *COMMON, "--out-dir", str(out_dir), *flags]))


def run(out_dir: Path, steps: int, *flags: str) -> dict:
    """A run that fails, rather than going on for ever, if it trains past --steps."""
    def never_past_the_end(record):
        assert record["step"] <= steps, f"trained step {record['step']} of --steps {steps}"

    return train.train(parse(out_dir, "--steps", str(steps), *flags), hooks=[never_past_the_end])


def snapshot(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(out_dir / "checkpoints")}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("six")
    run(out, 6, "--checkpoint-every", "2", "--keep-checkpoints", "5")
    return out


def copy_run(source: Path, target: Path) -> Path:
    (target / "checkpoints").mkdir(parents=True)
    for name, data in snapshot(source).items():
        (target / "checkpoints" / name).write_bytes(data)
    return target


# ---------------------------------------------------------------- 1. resuming at or past --steps


def test_resume_at_steps_trains_nothing_and_keeps_the_checkpoints(six_steps, tmp_path):
    out = copy_run(six_steps, tmp_path)
    before = snapshot(out)
    summary = run(out, 6, "--checkpoint-every", "2", "--keep-checkpoints", "1", "--resume")
    assert (summary["resumed_from"], summary["steps"]) == (6, 0)
    assert snapshot(out) == before


def test_resume_past_steps_is_one_line_naming_steps_and_deletes_nothing(six_steps, tmp_path):
    out = copy_run(six_steps, tmp_path)
    before = snapshot(out)
    with pytest.raises(ConfigError) as error:
        run(out, 4, "--checkpoint-every", "2", "--resume")
    message = str(error.value)
    assert "\n" not in message and "--steps 4 is below step 6" in message and "step_00000006.pt" in message
    assert snapshot(out) == before


# ---------------------------------------------------------------- 2. pruning around a damaged checkpoint


def test_pruning_never_leaves_only_a_damaged_checkpoint(six_steps, tmp_path, capsys):
    """The issue's reproduction: step 6 truncated, resumed to step 5 keeping 1 checkpoint."""
    out = copy_run(six_steps, tmp_path)
    damaged = checkpoint.checkpoint_path(out / "checkpoints", 6)
    os.truncate(damaged, 1000)
    summary = run(out, 5, "--checkpoint-every", "1", "--keep-checkpoints", "1", "--resume")
    assert summary["resumed_from"] == 4
    assert sorted(snapshot(out)) == ["step_00000005.pt", "step_00000006.pt"]  # the good one, and 6 untouched
    capsys.readouterr()
    path, state = checkpoint.load_newest(out / "checkpoints")
    assert path.name == "step_00000005.pt" and state["step"] == 5
    assert str(damaged) in capsys.readouterr().err


# ---------------------------------------------------------------- 3. one job per --out-dir

HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_job_on_the_same_out_dir_fails_at_once_naming_the_holder(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / train.LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = f"--out-dir {tmp_path} is in use by another job (pid {holder.pid} holds"
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(tmp_path, 2, "--resume")
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait()
    # The holder is gone, its pid still in the file: a stale lock, taken over.
    assert (tmp_path / train.LOCK_NAME).read_text() == f"{holder.pid}\n"
    run(tmp_path, 2)
    assert not (tmp_path / train.LOCK_NAME).exists()


def test_the_job_holds_the_lock_while_it_trains(tmp_path):
    seen = []

    def try_the_lock(record):
        fd = os.open(tmp_path / train.LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(os.pread(fd, 32, 0).decode())
        finally:
            os.close(fd)

    train.train(parse(tmp_path, "--steps", "1"), hooks=[try_the_lock])
    assert seen == [f"{os.getpid()}\n"]


# ---------------------------------------------------------------- 4. workers die with their launcher


def announce_and_wait() -> None:
    """A spawned rank: says which process it is (and its parent, the forkserver), then waits for ever."""
    os.write(1, f"{os.getpid()} {os.getppid()}\n".encode())  # one write: the two ranks' lines never interleave
    signal.pause()


LAUNCH = f"""
import sys
sys.path[:0] = [{str(TESTS / "training")!r}, {str(TESTS)!r}]
from cs336_systems.distributed.launch import launch
import test_faults
launch(test_faults.announce_and_wait, 2, backend="gloo")
"""
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@pytest.fixture
def subreaper():
    """Orphans of this test (the launcher's workers and forkserver) become children of this process,
    so that the test can wait for their exit and reap them."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    yield
    prctl(PR_SET_CHILD_SUBREAPER, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_killing_the_launcher_ends_its_workers(subreaper):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        for _ in range(2):
            worker, forkserver = map(int, launcher.stdout.readline().split())
            pids.append(worker)
        pids.append(forkserver)
        exits = {pid: os.pidfd_open(pid) for pid in pids}  # readable once the process has exited
        launcher.kill()
        launcher.wait()
        for pid, fd in exits.items():
            readable, _, _ = select.select([fd], [], [], 30)
            os.close(fd)
            assert readable, f"process {pid} outlived its launcher"
    finally:
        for pid in pids:  # by now children of this process (the subreaper): end and reap them
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# ---------------------------------------------------------------- 5. equal runs, equal bits


def test_two_cpu_runs_on_two_threads_are_bit_equal(tmp_path):
    """2 threads, and batches large enough that the embedding backward splits its rows over them."""
    torch.set_num_threads(2)
    try:
        weights = []
        for name in ("a", "b"):
            run(tmp_path / name, 2, "--batch-size", "16", "--context-length", "128", "--checkpoint-every", "2")
            weights.append(checkpoint.load_newest(tmp_path / name / "checkpoints")[1]["model"])
    finally:
        torch.set_num_threads(1)
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_resuming_another_model_is_one_line_naming_a_tensor_and_both_shapes(six_steps, tmp_path):
    """A checkpoint of the tiny preset resumed with --d-model 128: one line before anything is loaded."""
    (tmp_path / "checkpoints").mkdir()
    newest = checkpoint.list_checkpoints(six_steps / "checkpoints")[-1]
    (tmp_path / "checkpoints" / newest.name).write_bytes(newest.read_bytes())
    with pytest.raises(ConfigError, match=r"^--resume: .* holds another model: \S+ is \(\d+, 64\) there and "
                                          r"\(\d+, 128\) here"):
        run(tmp_path, 8, "--d-model", "128", "--resume")


def test_no_loadable_checkpoint_is_a_config_error(tmp_path):
    """Only damaged checkpoints: the CLI prints one line (a ConfigError), not a traceback."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000002.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError):
        run(tmp_path, 4, "--resume")
