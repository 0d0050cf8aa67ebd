"""The stamp a trainer puts on a served adapter's live directory after each change, and the
report of what vLLM's worker loaded (``contracts/live_adapter.py``)."""

from __future__ import annotations

from hogwild.contracts.live_adapter import FILE_NAME, read_served, read_stamp, write_served, write_stamp


def test_a_stamp_reads_back_and_a_rewrite_of_the_same_version_differs(tmp_path):
    assert read_stamp(tmp_path) is None and read_served(tmp_path) is None  # not one of the trainer's adapters
    first = write_stamp(tmp_path, 3)
    assert read_stamp(tmp_path) == first and first[0] == 3
    inode = (tmp_path / FILE_NAME).stat().st_ino
    again = write_stamp(tmp_path, 3)  # a restored trainer at a version a dead one had reached
    assert again != first and read_stamp(tmp_path) == again
    assert (tmp_path / FILE_NAME).stat().st_ino == inode  # written in place: a reader by path sees the current one


def test_a_short_stamp_reads_as_none_and_the_served_report_reads_back(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"\x01\x02")
    assert read_stamp(tmp_path) is None
    stamp = write_stamp(tmp_path, 7)
    write_served(tmp_path, stamp, 0.0025, True)
    served, seconds, in_place = read_served(tmp_path)
    assert served == stamp and abs(seconds - 0.0025) < 1e-9 and in_place
