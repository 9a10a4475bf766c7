"""Test helper: stopping a running subprocess with a real signal, never leaving it behind."""


def signal_and_wait(job, signum, timeout=60):
    """Send `signum` to the Popen `job`, wait for it to exit and return its stderr; a job that does not
    exit within `timeout` seconds is killed (and the test fails on its exit code)."""
    try:
        job.send_signal(signum)
        _, err = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    return err
