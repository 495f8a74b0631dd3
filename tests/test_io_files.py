"""Files: verified atomic writes, stale temp files, permissions, library messages, safe error lines, package layout."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PYDICOM_DIR, smooth_volume, write_nifti
from longitudinal.errors import InputError
from longitudinal.io import Image, atomic_write, atomic_write_text, load_image, save_image

ROOT = Path(__file__).resolve().parent.parent


def _image() -> Image:
    return Image(sitk.GetImageFromArray(smooth_volume((20, 30, 40)).astype(np.float32)))


# ----------------------------------------------------------------------------- verified writes


def test_a_write_that_produced_nothing_is_refused_and_the_old_file_kept(tmp_path):
    from longitudinal.errors import OutputError

    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(OutputError, match=r"result.json: not written: nothing was written \(0 bytes\)"):
        atomic_write(target, lambda tmp: None)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_short_text_write_is_refused(tmp_path, monkeypatch):
    from longitudinal.errors import OutputError

    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(self, data[: len(data) // 2]))
    with pytest.raises(OutputError, match=r"report.html: not written: 6 bytes written, expected 12"):
        atomic_write_text(tmp_path / "report.html", "twelve bytes")
    assert list(tmp_path.iterdir()) == []


def test_the_callers_check_decides_before_the_rename(tmp_path):
    from longitudinal.errors import OutputError
    from longitudinal.io import TEMP_PREFIX

    def refuse(tmp: Path) -> None:
        raise ValueError("checksum mismatch")

    with pytest.raises(OutputError, match="model.npz: not written: the written file does not read back: checksum"):
        atomic_write(tmp_path / "model.npz", lambda tmp: Path(tmp).write_bytes(b"data"), verify=refuse)
    assert list(tmp_path.iterdir()) == []
    checked = []
    atomic_write(tmp_path / "model.npz", lambda tmp: Path(tmp).write_bytes(b"data"), verify=checked.append,
                 expected_size=4)
    assert (tmp_path / "model.npz").read_bytes() == b"data" and checked[0].name.startswith(TEMP_PREFIX)


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_save_image_detects_a_short_nifti_write(tmp_path, monkeypatch, name):
    from longitudinal.errors import OutputError

    real = sitk.WriteImage

    def short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 3])

    monkeypatch.setattr(sitk, "WriteImage", short)
    with pytest.raises(OutputError, match=f"{name}: not written: the written file does not read back: .*truncated"):
        save_image(_image(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_image_detects_niftilibs_error_on_stderr(tmp_path, monkeypatch):
    from longitudinal.errors import OutputError

    """niftilib prints NWAD on a full disk and returns normally; the written file may even look whole."""
    real = sitk.WriteImage

    def nwad(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        os.write(2, b"** ERROR: NWAD: wrote only 0 of 6289920 bytes to file\n")

    monkeypatch.setattr(sitk, "WriteImage", nwad)
    with pytest.raises(OutputError, match=r"out.nii.gz: not written: \*\* ERROR: NWAD: wrote only 0 of 6289920 bytes"):
        save_image(_image(), tmp_path / "out.nii.gz")


def test_save_image_on_a_full_disk(tmp_path):
    from longitudinal.errors import OutputError

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KB tmpfs here ({mounted.stderr.decode().strip() or 'not permitted'})")
    noise = Image(sitk.GetImageFromArray(np.random.default_rng(0).random((50, 60, 70)).astype(np.float32)))
    try:
        for name in ("full.nii.gz", "full.nii", "full.mha"):  # 840 KB of incompressible voxels
            with pytest.raises(OutputError, match=f"{name}: not written: "):
                save_image(noise, tiny / name)
        assert list(tiny.iterdir()) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


# ----------------------------------------------------------------------------- temp files left by a killed writer


def test_a_writer_killed_mid_write_leaves_a_temp_file_clean_stale_temp_removes(tmp_path):
    from longitudinal.io import TEMP_PREFIX, clean_stale_temp

    target = tmp_path / "out" / "change_map.nii.gz"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from longitudinal.io import atomic_write
        def slow(tmp):
            Path(tmp).write_bytes(b"half a file")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, slow)
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list(target.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f"{TEMP_PREFIX}{proc.pid}-") and not target.exists()
    mine = target.parent / f"{TEMP_PREFIX}{os.getpid()}-0000-other.json"  # a live writer's: kept
    mine.write_text("{")
    assert clean_stale_temp(target.parent) == left
    assert list(target.parent.iterdir()) == [mine]
    assert clean_stale_temp(tmp_path / "absent") == []


# ----------------------------------------------------------------------------- permissions


def _as_nobody(paths: list[Path]) -> list[str]:
    """load_image on each path in a forked child that (when we are root, who reads everything) becomes nobody."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, the modules are already imported
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            lines = []
            for p in paths:
                try:
                    load_image(p)
                    lines.append(f"loaded {p}")
                except Exception as exc:
                    lines.append(f"{type(exc).__name__} {exc}")
            os.write(write, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out.splitlines()


def test_an_unreadable_file_is_reported_as_a_permission_error_not_missing():
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is private to root: nobody could enter it
    try:
        os.chmod(folder, 0o755)
        image = write_nifti(folder / "t1.nii.gz", smooth_volume((3, 4, 5)))
        locked = folder / "locked"
        locked.mkdir()
        write_nifti(locked / "t1.nii.gz", smooth_volume((3, 4, 5)))
        os.chmod(image, 0o000)
        os.chmod(locked, 0o000)
        assert _as_nobody([image, locked / "t1.nii.gz", locked]) == [
            f"InputError {image}: permission denied: the file cannot be read",
            f"InputError {locked / 't1.nii.gz'}: permission denied: a folder on its path cannot be entered",
            f"InputError {locked}: permission denied: the folder cannot be listed"]
    finally:
        os.chmod(folder / "locked", 0o700)
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- messages


def test_library_messages_go_to_the_log_not_the_terminal(capfd, caplog, monkeypatch):
    # cli.main() tests leave a handler on the "longitudinal" logger writing to their (closed) captured stderr
    monkeypatch.setattr(logging.getLogger("longitudinal"), "handlers", [])
    with caplog.at_level("DEBUG", logger="longitudinal"):
        image = load_image(PYDICOM_DIR / "JPGExtended.dcm")  # GDCM prints "Unsupported JPEG data precision 12"
    assert image.size == (256, 1024)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "Unsupported JPEG data precision 12" in caplog.text


def test_control_characters_in_names_are_escaped_in_errors(tmp_path):
    name = "evil\x1b[31mred\x1b[0m\u202e.nii.gz"
    (tmp_path / name).write_bytes(b"not a nifti")
    with pytest.raises(InputError) as err:
        load_image(tmp_path / name)
    msg = str(err.value)
    assert "\x1b" not in msg and "\u202e" not in msg
    assert "evil\\x1b[31mred\\x1b[0m\\u202e.nii.gz: " in msg


def test_the_io_package_keeps_its_public_names_and_no_test_writer():
    import longitudinal.io as io

    for name in ("Image", "Meta", "load_image", "describe", "save_image", "atomic_write", "atomic_write_text",
                 "ImageInfo", "SeriesInfo", "InputSettings", "clean_stale_temp"):
        assert hasattr(io, name), name
    assert not hasattr(io, "write_dicom_series")
    assert Path(io.__file__).name == "__init__.py"


def test_captures_in_two_threads_leave_stderr_where_it_was(capfd):
    # write_outputs runs writers in threads. A capture that started inside another and ended after it put back
    # what it had saved, the other's temp file: everything written to stderr after went into a closed file.
    import threading
    import time

    from longitudinal.io.native import library_messages

    a_in, b_in = threading.Event(), threading.Event()
    got: dict[str, list[str]] = {}

    def first() -> None:
        with library_messages("a") as lines:
            a_in.set()
            b_in.wait(timeout=0.5)  # one at a time: b starts only after a has ended
            os.write(2, b"inside a\n")
        got["a"] = lines

    def second() -> None:
        a_in.wait()
        with library_messages("b") as lines:
            b_in.set()
            time.sleep(0.3)
            os.write(2, b"inside b\n")
        got["b"] = lines

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.write(2, b"after both\n")
    _, err = capfd.readouterr()
    assert got == {"a": ["inside a"], "b": ["inside b"]}
    assert err == "after both\n"


def test_a_log_record_from_another_thread_waits_for_a_capture_to_end(capfd):
    import threading
    import time

    from longitudinal.io.native import StderrHandler, library_messages

    logger = logging.getLogger("longitudinal.test_capture")
    stream = open(2, "w", closefd=False)  # file descriptor 2 itself, which a capture redirects
    handler = StderrHandler(stream)
    logger.addHandler(handler)
    started = threading.Event()
    captured: list[str] = []

    def capture() -> None:
        with library_messages("library") as lines:
            started.set()
            time.sleep(0.3)
        captured.extend(lines)

    try:
        t = threading.Thread(target=capture)
        t.start()
        started.wait()
        logger.warning("a warning the user must see")
        t.join()
    finally:
        logger.removeHandler(handler)
        stream.close()
    _, err = capfd.readouterr()
    assert captured == []
    assert "a warning the user must see" in err
