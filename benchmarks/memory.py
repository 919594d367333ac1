"""Peak memory of this process and its child processes, sampled by a background thread.

Resident set sizes (RSS) of forked workers count the pages they share with their parent
once per process, so their sum overstates the machine memory in use. The proportional
set size (PSS) splits each shared page between the processes that map it, so its sum is
the machine memory the process tree occupies, as long as no process outside the tree maps
the same pages. A parent that has imported torch shares its library pages with the tree, so
the tree's PSS sum leaves out the parent's part of them. A third measure does not depend on
other processes: the RSS of the measured process, which counts every page it maps, plus
the unique set size (USS, the pages no other process maps) of each descendant. All three
are recorded, and a peak shorter than the sampling interval can be missed. Reading the PSS
walks the page tables of each process: it took 18 ms for a 1.1 GiB torch process on a 2-core AMD EPYC, so at 10 Hz it
would slow the measured run itself. The PSS is therefore read 20 times less often.
"""
import resource
import threading

import psutil

_MIB = 1024 * 1024


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _tree_memory(process: psutil.Process, with_pss: bool) -> tuple[int, int | None, int | None, int]:
    """Return memory in bytes of `process` and its descendants, and their count.

    The values are the RSS sum, the PSS sum, and the RSS of `process` plus the USS of its
    descendants. The last two are None unless `with_pss`.
    """
    rss = pss = own = count = 0
    for member in _tree(process):
        try:
            info = member.memory_full_info() if with_pss else member.memory_info()
        except psutil.Error:  # a worker that exited between listing and reading
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        own += info.rss if member.pid == process.pid else getattr(info, "uss", info.rss)
        count += 1
    return rss, pss if with_pss else None, own if with_pss else None, count


class PeakMemorySampler:
    """Context manager recording the peak memory of this process tree.

    The RSS is read every `interval_s` seconds and the PSS and USS every `pss_every`
    readings, and all at entry and exit. Attributes after exit (MiB): `peak_rss_mib` and
    `peak_pss_mib` (sums over the tree), `peak_rss_uss_mib` (this process's RSS plus its
    descendants' USS), `start_rss_mib` (the RSS sum at entry), and `max_processes`, the most
    processes seen at once.
    """

    def __init__(self, interval_s: float = 0.1, pss_every: int = 20):
        self.interval_s = interval_s
        self.pss_every = pss_every
        self._readings = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss_mib = self.peak_pss_mib = self.peak_rss_uss_mib = self.start_rss_mib = 0.0
        self.max_processes = 0

    def _sample(self, with_pss: bool) -> None:
        rss, pss, own, count = _tree_memory(self._process, with_pss)
        self.peak_rss_mib = max(self.peak_rss_mib, rss / _MIB)
        if pss is not None:
            self.peak_pss_mib = max(self.peak_pss_mib, pss / _MIB)
            self.peak_rss_uss_mib = max(self.peak_rss_uss_mib, own / _MIB)
        self.max_processes = max(self.max_processes, count)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._readings += 1
            self._sample(with_pss=self._readings % self.pss_every == 0)

    def __enter__(self) -> "PeakMemorySampler":
        self.start_rss_mib = _tree_memory(self._process, with_pss=False)[0] / _MIB
        self._sample(with_pss=True)
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(with_pss=True)


def max_rss_mib() -> float:
    """Return this process's peak RSS over its whole life (getrusage ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_bytes() -> int:
    """Return the memory the system can give new allocations without swapping (psutil's `available`).

    NOTE: a cgroup memory limit, as in a container, is not taken into account, so a run
    can pass this check and still be stopped at the limit.
    """
    return psutil.virtual_memory().available
