from cyllm.coordinator.queue import InMemoryTaskQueue, Task


def test_higher_priority_first_and_fifo_within_a_priority():
    q = InMemoryTaskQueue(max_size=10)
    for tid, prio in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]:
        q.push(Task(tid, "m", prio))
    order = [q.pop_first(lambda t: True).task_id for _ in range(5)]
    assert order == ["b", "d", "a", "c", "e"]
    assert len(q) == 0


def test_full_queue_takes_nothing_more():
    q = InMemoryTaskQueue(max_size=2)
    assert q.push(Task("a", "m")) and q.push(Task("b", "m"))
    assert q.push(Task("c", "m")) is False
    assert [q.pop_first(lambda t: True).task_id for _ in range(2)] == ["a", "b"]


def test_pop_first_skips_tasks_that_are_not_ready():
    q = InMemoryTaskQueue(max_size=10)
    q.push(Task("a", "busy-model", 9))
    q.push(Task("b", "free-model", 0))
    got = q.pop_first(lambda t: t.model == "free-model")
    assert got.task_id == "b"
    assert len(q) == 1


def test_remove_withdraws_a_waiting_task_once():
    q = InMemoryTaskQueue(max_size=10)
    t = Task("a", "m")
    q.push(t)
    assert q.remove(t) is True
    assert q.remove(t) is False
    assert q.pop_first(lambda _: True) is None
