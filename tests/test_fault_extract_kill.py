"""Killed and stopped extract.py runs resume to the file an uninterrupted run writes.

Each test runs the real script in a subprocess on a few hundred generated images and
ends it with a real signal. SIGKILL comes at seeded random points while windows are
embedded and, through a kill hook, at exact points of the final assembly. SIGTERM and
SIGINT must stop the run cleanly. Rerunning the same command must then give the reference
output: the same ids in the same order, equal embeddings, and nothing else on disk.
"""
import json
import os
import random
import shutil
import signal
import sys
import time

import pytest

from feature_extraction.interrupts import Interrupted, interrupts_deferred, signals_raise_interrupted
from feature_extraction.store import PartStore

from conftest import write_image
from fault_injection import (
    EXTRACT,
    TINY_MODEL,
    assert_same_extraction,
    command,
    folder_listing,
    hooked_command,
    kill_and_reap,
    read_hdf5,
    run,
    start,
    wait_for,
)

NUM_IMAGES = 240
NUM_ROWS = NUM_IMAGES + 2  # two unreadable files
WINDOW_SIZE = 16
NUM_WINDOWS = -(-NUM_ROWS // WINDOW_SIZE)
OUTPUT_NAME = "features_uned.hdf5"
FINAL_LISTING = [OUTPUT_NAME, OUTPUT_NAME + ".failed.txt"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """240 small images in three shapes, two unreadable files, and the list of all 242."""
    base = tmp_path_factory.mktemp("kill_images")
    root = base / "images"
    lines = []
    for i in range(NUM_IMAGES):
        relative = f"d{i % 3}/img_{i:04d}.jpg"
        write_image(root / relative, (64 + (i % 3) * 8, 48), seed=i)
        lines.append(f"{relative},{i % 7},{i % 3}")
    # unreadable rows in two windows, so the failure report is part of what must survive
    (root / "broken").mkdir()
    (root / "broken" / "empty.jpg").write_bytes(b"")
    lines.insert(37, "broken/empty.jpg,0,0")
    lines.insert(150, "broken/missing.jpg,0,0")
    list_path = base / "list.txt"
    list_path.write_text("\n".join(lines) + "\n")
    return root, list_path


def _args(images, out_dir, *extra):
    root, list_path = images
    return ["--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", out_dir, *TINY_MODEL,
            "--window_size", WINDOW_SIZE, *extra]


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The output of one uninterrupted run, made the same way as the killed runs."""
    out_dir = tmp_path_factory.mktemp("kill_reference")
    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    output = out_dir / OUTPUT_NAME
    features, ids, attrs = read_hdf5(output)
    assert features.shape == (NUM_IMAGES, 64)
    assert attrs["num_failed"] == 2
    assert folder_listing(out_dir) == FINAL_LISTING
    return output


def _parts(out_dir):
    return out_dir / (OUTPUT_NAME + ".parts")


def _saved_windows(out_dir) -> int:
    return len(list(_parts(out_dir).glob("window_*.npz")))


def _assert_nothing_final(out_dir):
    """After a kill before publishing: no file under the final name, no temporary HDF5 beside it."""
    assert not (out_dir / OUTPUT_NAME).exists()
    leftovers = [name for name in folder_listing(out_dir) if not name.startswith(OUTPUT_NAME + ".parts")]
    # a kill after the report was written but before the rename may leave the report alone
    assert set(leftovers) <= {OUTPUT_NAME + ".tmp", OUTPUT_NAME + ".failed.txt"}


def _assert_final_files(out_dir, reference):
    """The output equals the reference, with the same failure report and nothing else beside it."""
    assert_same_extraction(out_dir / OUTPUT_NAME, reference)
    report = out_dir / (OUTPUT_NAME + ".failed.txt")
    assert report.read_text() == reference.with_name(report.name).read_text()
    assert folder_listing(out_dir) == FINAL_LISTING


# Runs that are signalled from outside take at least this many milliseconds per window
# written. A seeded random delay then lands inside the embedding however fast the machine
# is, because the tiny model alone needs only a few milliseconds per window.
WINDOW_MILLISECONDS = 60


def _paced(images, out_dir, *extra, read_ms=0):
    """Return the argv and environment of a run whose window writes (and part reads) are slowed."""
    delays = f"write_window={WINDOW_MILLISECONDS}" + (f",read_window={read_ms}" if read_ms else "")
    argv = hooked_command(EXTRACT, _args(images, out_dir, *extra), "none")
    return argv, {**os.environ, "FAULT_DELAY_MS": delays}


def _kill_when(images, out_dir, condition, delay: float = 0.0, read_ms: int = 0) -> None:
    """Start a paced run, SIGKILL it once `condition()` is true (plus `delay` seconds), check what is left."""
    argv, env = _paced(images, out_dir, read_ms=read_ms)
    process = start(argv, env=env)
    reached = wait_for(condition, process, interval=0.0005)
    time.sleep(delay)
    kill_and_reap(process)
    assert reached, "the run ended before the kill point"
    assert process.returncode == -signal.SIGKILL
    _assert_nothing_final(out_dir)


def _run_hooked(images, out_dir, point, count=1, signal_name="SIGKILL"):
    result = run(hooked_command(EXTRACT, _args(images, out_dir), point, count, signal_name))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def test_sigkill_at_many_points_resumes(images, reference, tmp_path):
    out_dir = tmp_path / "out"
    rng = random.Random(1234)

    # a part file written but not renamed (a new run renames the manifest, window 0, window 1)
    result = _run_hooked(images, out_dir, "part_before_rename", 3)
    assert result.returncode == -signal.SIGKILL
    assert _saved_windows(out_dir) == 1
    assert len(list(_parts(out_dir).glob("window_000001.npz.*.tmp"))) == 1
    _assert_nothing_final(out_dir)

    # two kills at seeded random times while windows are embedded, after the first new one
    for _ in range(2):
        saved = _saved_windows(out_dir)
        pending = NUM_WINDOWS - saved
        delay = rng.uniform(0.0, 0.6) * pending * WINDOW_MILLISECONDS / 1000
        _kill_when(images, out_dir, lambda: _saved_windows(out_dir) > saved, delay=delay)
        assert saved < _saved_windows(out_dir) < NUM_WINDOWS

    # the last window saved, nothing assembled yet
    result = _run_hooked(images, out_dir, "after_window_write", NUM_WINDOWS - _saved_windows(out_dir))
    assert result.returncode == -signal.SIGKILL
    assert _saved_windows(out_dir) == NUM_WINDOWS
    _assert_nothing_final(out_dir)

    # as soon as the temporary HDF5 file appears (the assembly is slowed down to be seen)
    temporary = out_dir / (OUTPUT_NAME + ".tmp")
    _kill_when(images, out_dir, temporary.exists, read_ms=30)

    # the HDF5 file half assembled
    result = _run_hooked(images, out_dir, "assembly_read", NUM_WINDOWS // 2)
    assert result.returncode == -signal.SIGKILL
    _assert_nothing_final(out_dir)

    # the temporary HDF5 file complete and the failure report written, but not renamed
    result = _run_hooked(images, out_dir, "before_publish")
    assert result.returncode == -signal.SIGKILL
    _assert_nothing_final(out_dir)
    assert temporary.exists()
    assert (out_dir / (OUTPUT_NAME + ".failed.txt")).exists()

    # renamed, then killed while the parts folder was half deleted
    result = _run_hooked(images, out_dir, "removing_parts")
    assert result.returncode == -signal.SIGKILL
    assert_same_extraction(out_dir / OUTPUT_NAME, reference)
    assert _parts(out_dir).exists()

    # the rerun leaves the complete output untouched and clears the rest
    stamp = (out_dir / OUTPUT_NAME).stat().st_mtime_ns
    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left untouched" in result.stderr
    assert (out_dir / OUTPUT_NAME).stat().st_mtime_ns == stamp
    _assert_final_files(out_dir, reference)


def test_sigkill_during_overwrite_keeps_old_output(images, reference, tmp_path):
    out_dir = tmp_path / "out"
    output, report = out_dir / OUTPUT_NAME, out_dir / (OUTPUT_NAME + ".failed.txt")
    result = run(command(EXTRACT, _args(images, out_dir, "--resolution", "48")))
    assert result.returncode == 0, result.stderr[-3000:]
    old_output, old_report = output.read_bytes(), report.read_bytes()
    report_stamp = report.stat().st_mtime_ns

    # killed while the replacement's windows are saved
    result = run(hooked_command(EXTRACT, _args(images, out_dir, "--overwrite", "true"), "after_window_write", 5))
    assert result.returncode == -signal.SIGKILL
    assert _saved_windows(out_dir) == 5
    assert output.read_bytes() == old_output
    assert report.read_bytes() == old_report
    assert report.stat().st_mtime_ns == report_stamp

    # resumed without --overwrite, killed with the temporary file and the new report written but not renamed
    result = _run_hooked(images, out_dir, "before_publish")
    assert result.returncode == -signal.SIGKILL
    assert "resuming the partial run of --overwrite true" in result.stderr
    assert f"resuming: 5 of {NUM_WINDOWS} windows" in result.stderr
    assert output.read_bytes() == old_output

    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {NUM_WINDOWS} of {NUM_WINDOWS} windows" in result.stderr
    _assert_final_files(out_dir, reference)


def test_sigkill_before_rename_keeps_pair(images, tmp_path):
    # Regression: a kill between the report's rename and the output's left the replacement's
    # report and its full-size temporary file beside the old output. A rerun with the old
    # output's settings kept both, and deleting the parts folder as advised made that final.
    out_dir = tmp_path / "out"
    output, report = out_dir / OUTPUT_NAME, out_dir / (OUTPUT_NAME + ".failed.txt")
    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    old_output, old_report = output.read_bytes(), report.read_text()

    # the 80x48 images exceed the pixel limit, so the replacement's report lists them too
    replacement = _args(images, out_dir, "--overwrite", "true", "--max_image_pixels", "3500")
    result = run(hooked_command(EXTRACT, replacement, "before_publish"))
    assert result.returncode == -signal.SIGKILL
    assert output.read_bytes() == old_output
    assert report.read_text() != old_report

    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left untouched" in result.stderr
    assert output.read_bytes() == old_output
    assert report.read_text() == old_report
    assert not (out_dir / (OUTPUT_NAME + ".tmp")).exists()

    # discarding the partial run, as the warning advises, leaves the old pair alone
    shutil.rmtree(_parts(out_dir))
    assert folder_listing(out_dir) == FINAL_LISTING
    assert report.read_text() == old_report


def _assert_stopped(returncode, stderr, name, exit_status) -> None:
    assert returncode == exit_status, stderr[-3000:]
    assert f"stopped by {name}" in stderr
    assert "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr


def test_sigint_and_sigterm_stop_cleanly_and_resume(images, reference, tmp_path):
    out_dir = tmp_path / "out"
    rng = random.Random(4321)
    # one decoding worker, and the signal sent to the whole process group as Ctrl-C in a
    # terminal and a batch scheduler's cancel do, so the worker receives it too
    args = ("--num_workers", "1")
    for signal_number, name, exit_status in ((signal.SIGINT, "SIGINT", 130), (signal.SIGTERM, "SIGTERM", 143)):
        saved = _saved_windows(out_dir) if _parts(out_dir).exists() else 0
        argv, env = _paced(images, out_dir, *args)
        process = start(argv, env=env, start_new_session=True)
        assert wait_for(lambda: _saved_windows(out_dir) > saved, process, interval=0.0005)
        time.sleep(rng.uniform(0.0, 0.5) * (NUM_WINDOWS - saved) * WINDOW_MILLISECONDS / 1000)
        os.killpg(process.pid, signal_number)
        _, stderr = process.communicate(timeout=120)
        _assert_stopped(process.returncode, stderr, name, exit_status)
        _assert_nothing_final(out_dir)
        assert not (out_dir / (OUTPUT_NAME + ".tmp")).exists()

    # SIGTERM while the HDF5 file is assembled, once the remaining windows are saved
    result = run(hooked_command(EXTRACT, _args(images, out_dir, *args), "assembly_read", 2, "SIGTERM"))
    _assert_stopped(result.returncode, result.stderr, "SIGTERM", 143)
    assert f"{NUM_ROWS} of {NUM_ROWS} rows are saved" in result.stderr
    _assert_nothing_final(out_dir)
    assert not (out_dir / (OUTPUT_NAME + ".tmp")).exists()

    # SIGTERM right after the rename: the output is complete and the message says so
    # (regression: it said that the rows were saved in the parts folder, to be resumed)
    result = run(hooked_command(EXTRACT, _args(images, out_dir, *args), "after_publish", 1, "SIGTERM"))
    assert result.returncode == 143, result.stderr[-3000:]
    assert f"stopped by SIGTERM after {out_dir / OUTPUT_NAME} was complete" in result.stderr
    assert "Traceback" not in result.stderr
    assert_same_extraction(out_dir / OUTPUT_NAME, reference)

    result = run(command(EXTRACT, _args(images, out_dir, *args)))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_final_files(out_dir, reference)


def test_signal_inside_deferred_block_raises_after_it():
    # Regression: SIGTERM or SIGINT raised Interrupted in the middle of receiving a batch
    # from a DataLoader worker, and the dropped connection made the worker print a
    # traceback. The signal now takes effect once the batch is received.
    steps = []
    with pytest.raises(Interrupted) as stopped:
        with signals_raise_interrupted():
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("block finished")
            steps.append("after the block")
    assert steps == ["block finished"]
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_decoding_worker_ignores_stop_signals():
    # Regression: a SIGTERM sent to the whole process group (a scheduler's cancel) killed
    # the decoding worker before the main process could stop it, and the main process
    # failed with "DataLoader worker is killed by signal" tracebacks.
    code = ("import signal; from feature_extraction.dataset import _init_worker; _init_worker(0); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    result = run([sys.executable, "-c", code])
    assert result.stdout.split() == ["True", "True"], result.stderr


def test_sigkill_releases_parts_lock_at_once(images, tmp_path):
    # Regression: the parts folder lock was an flock shared with the forked decoding
    # workers, which outlive a SIGKILLed main process by up to 5 s. A rerun started
    # meanwhile (a requeued job) stopped with "another process is extracting".
    out_dir = tmp_path / "out"
    argv, env = _paced(images, out_dir, "--num_workers", "1")
    process = start(argv, env=env)
    assert wait_for(lambda: _saved_windows(out_dir) >= 1, process)
    # wait for the main process only: the orphaned worker keeps the stderr pipe open
    process.kill()
    process.wait(timeout=60)

    manifest = json.loads((_parts(out_dir) / "manifest.json").read_text())
    store = PartStore(_parts(out_dir))
    store.open(manifest["fingerprint"], manifest["info"])
    store.close()
    process.communicate(timeout=60)


def _worker_pids(pid: int) -> list[int]:
    """Return the child processes of `pid` that run its own command line: the forked decode workers."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(child) for child in f.read().split()]
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if f.read() == cmdline:
                    workers.append(child)
        except FileNotFoundError:
            pass
    return workers


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux /proc children lists")
def test_killed_decode_worker_stops_run(images, reference, tmp_path):
    # Regression: after the kernel killed a decode worker (SIGKILL, as the OOM killer does), the
    # main process printed a traceback and then waited forever for the other worker, which
    # ignores the SIGTERM that DataLoader and multiprocessing send at shutdown.
    out_dir = tmp_path / "out"
    argv, env = _paced(images, out_dir, "--num_workers", "2")
    process = start(argv, env=env)
    assert wait_for(lambda: _saved_windows(out_dir) >= 1, process)
    assert wait_for(lambda: len(_worker_pids(process.pid)) == 2, process)
    os.kill(_worker_pids(process.pid)[0], signal.SIGKILL)

    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert "a decode worker process was killed by SIGKILL during the run" in stderr
    assert "Rerun the same command, which resumes from the windows saved so far" in stderr
    assert "Traceback" not in stderr
    _assert_nothing_final(out_dir)

    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_final_files(out_dir, reference)


@pytest.mark.parametrize("point, signal_name, exit_status", [("decode", "SIGINT", 130), ("exif", "SIGTERM", 143)])
def test_signal_while_decoding_in_main_process_stops(point, signal_name, exit_status, images, reference, tmp_path):
    # With --num_workers 0 the images are decoded in the main process, inside load_image's
    # catch-all error handling. A signal there must stop the run, not mark the image unreadable.
    out_dir = tmp_path / "out"
    args = _args(images, out_dir, "--num_workers", "0")
    result = run(hooked_command(EXTRACT, args, point, 20, signal_name))
    _assert_stopped(result.returncode, result.stderr, signal_name, exit_status)
    _assert_nothing_final(out_dir)
    assert signal_name not in "".join(p.read_text() for p in out_dir.rglob("*.txt"))

    result = run(command(EXTRACT, args))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_final_files(out_dir, reference)


def test_dropped_signal_stops_extraction(images, reference, tmp_path):
    # Regression: a signal whose handler ran inside a __del__ method was printed as
    # "Exception ignored", and the extraction went on to the end.
    out_dir = tmp_path / "out"
    result = run(hooked_command(EXTRACT, _args(images, out_dir), "embed", 3, "SIGTERM:finalizer"))
    assert "Exception ignored" in result.stderr
    _assert_stopped(result.returncode, result.stderr.replace("Traceback", ""), "SIGTERM", 143)
    _assert_nothing_final(out_dir)

    result = run(command(EXTRACT, _args(images, out_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_final_files(out_dir, reference)
