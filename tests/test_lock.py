import subprocess
import sys
import time

import pytest

from d2r._io import file_digest
from d2r._lock import LockedError, WriterLock
from tests.corpus import run_cli, write_photos

HOLD = "import sys, time; from d2r._lock import WriterLock; l = WriterLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(float(sys.argv[2]))"


def test_second_writer_in_another_process_is_refused_then_admitted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"{tmp_path}.*another writer \(pid {proc.pid}\)"):
            WriterLock(tmp_path, timeout=0).acquire()
        start = time.monotonic()
        with WriterLock(tmp_path, timeout=30) as lock:  # waits until the holder exits
            assert lock.held
        assert time.monotonic() - start > 0.2
    finally:
        proc.kill()
        proc.wait()


def test_killed_holder_frees_the_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    with WriterLock(tmp_path, timeout=0):
        pass


def test_timeout_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="timeout"):
        WriterLock(tmp_path, timeout=-1)


@pytest.mark.parametrize("command", ["index", "extract"])
def test_lock_timeout_nan_is_usage_error(tmp_path, capsys, command):
    """`--lock-timeout nan` was accepted and waited forever for a held lock."""
    photos = write_photos(tmp_path / "photos", ["p0"], 7)
    argv = (["index", "add", tmp_path / "eng", photos] if command == "index" else
            ["extract", "--images", photos, "--features", "rootsift", "--out", tmp_path / "store"])
    code, _, err = run_cli(capsys, *argv, "--lock-timeout", "nan", "--quiet")
    assert code == 2 and "--lock-timeout must be >= 0 seconds, got nan" in err, err


def test_file_digest_changes_with_one_byte(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 3_000_000)
    d = file_digest(p, chunk=4096)
    assert d == file_digest(p) and len(d) == 32
    p.write_bytes(b"x" * 2_999_999 + b"y")
    assert file_digest(p) != d
