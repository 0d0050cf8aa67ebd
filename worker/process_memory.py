"""This process's memory, split the way that matters for "no second copy"."""

from __future__ import annotations


def memory_snapshot() -> dict[str, int]:
    """Bytes from /proc/self/status: ``rss_anon`` is private memory this process
    allocated itself; ``rss_shmem`` is shared memory it has mapped (the served
    weights on CPU); ``rss_file`` is file-backed pages (libraries)."""
    fields = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem", "VmRSS": "rss", "VmHWM": "peak_rss"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so
    that measurements show what is held, not what was once used."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
