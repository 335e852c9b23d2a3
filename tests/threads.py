"""The one thread helper of every concurrency test: a test fails on any error in any thread and on
any thread still alive after its join."""

import threading
from collections.abc import Callable


class Worker:
    """Runs `target()` on a thread; `result()` joins it, re-raises its error, fails if it still runs."""

    def __init__(self, target: Callable, barrier: threading.Barrier | None = None):
        self.value, self.error = None, None
        self._target, self._barrier = target, barrier
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            if self._barrier is not None:
                self._barrier.wait()
            self.value = self._target()
        except BaseException as error:  # re-raised by result() on the test's thread
            self.error = error

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def result(self, timeout: float = 120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"a thread still ran {timeout} s after the test joined it"
        if self.error is not None:
            raise AssertionError(f"the thread raised {self.error!r}") from self.error
        return self.value


def run_threads(target: Callable[[int], object], num_threads: int, timeout: float = 120) -> list:
    """`target(index)` on `num_threads` threads released together; their results in index order.

    Fails with every thread's error, or if a thread is still alive after `timeout`.
    """
    barrier = threading.Barrier(num_threads)
    workers = [Worker(lambda index=index: target(index), barrier).start() for index in range(num_threads)]
    for worker in workers:
        worker.thread.join(timeout)
    alive = [index for index, worker in enumerate(workers) if worker.thread.is_alive()]
    assert not alive, f"threads {alive} still ran {timeout} s after the test joined them"
    errors = [(index, worker.error) for index, worker in enumerate(workers) if worker.error is not None]
    if errors:
        raise AssertionError(f"threads raised: {errors}") from errors[0][1]
    return [worker.value for worker in workers]
