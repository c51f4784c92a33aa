"""A posterior's lock: queries go before the background stage (app.queries.priority)."""

from __future__ import annotations

import threading
import time

from app.queries.priority import QueryFirstLock

TURN_S = 0.05


def run_background(lock: QueryFirstLock, turns: int, log: list[tuple[str, float]],
                   stop: threading.Event) -> threading.Thread:
    def work() -> None:
        for _ in range(turns):
            with lock.background(stop.is_set):
                log.append(("turn", time.monotonic()))
                time.sleep(TURN_S)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_a_query_waits_at_most_for_the_turn_in_progress():
    lock, log, stop = QueryFirstLock(), [], threading.Event()
    background = run_background(lock, 40, log, stop)
    for _ in range(5):
        time.sleep(2.5 * TURN_S)  # let some turns run
        arrived = time.monotonic()
        with lock.query():
            got = time.monotonic()
            time.sleep(TURN_S)  # while a query holds it, no turn starts
        turns_begun = [t for _, t in log if arrived < t < got + TURN_S]
        assert turns_begun == [], "a background turn began after the query came"
        assert got - arrived < 4 * TURN_S  # one turn, and room for a loaded machine
    stop.set()
    background.join(timeout=10)
    assert not background.is_alive()


def test_background_turns_wait_while_queries_keep_coming():
    lock, log, stop = QueryFirstLock(), [], threading.Event()

    def query_stream() -> None:  # overlapping queries: always one holding or waiting
        with lock.query():
            time.sleep(TURN_S)

    threads = [threading.Thread(target=query_stream) for _ in range(8)]
    for t in threads:
        t.start()
    started = time.monotonic()
    background = run_background(lock, 1, log, stop)
    for t in threads:
        t.join()
    background.join(timeout=10)
    assert len(log) == 1 and log[0][1] >= started + 7 * TURN_S  # after all eight


def test_a_stopped_background_turn_still_runs_alone():
    """Told to stop while a query holds the lock, a turn waits for it (the work checks
    and stops on its own) rather than run beside it."""
    lock, log, stop = QueryFirstLock(), [], threading.Event()
    stop.set()
    with lock.query():
        background = run_background(lock, 1, log, stop)
        time.sleep(3 * TURN_S)
        assert log == []
        released = time.monotonic()
    background.join(timeout=10)
    assert len(log) == 1 and log[0][1] >= released
