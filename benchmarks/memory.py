"""The peak memory of a benchmark's process."""


def peak_rss_kib():
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a child of
    a large process would start at its parent's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
