"""Work that one process does for all: checks on the main process only, their failures raised on every rank."""

import pytest

from alps_trl.trainers import head_sources


class FakeAccelerator:
    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0


def _broadcast_from(main_payload):
    """A stand-in for accelerate's broadcast_object_list: every rank receives `main_payload`."""

    def broadcast(payload, from_process=0):
        payload[0] = main_payload[0]
        return payload

    return broadcast


def test_check_runs_on_the_main_process_only(monkeypatch):
    import accelerate.utils

    calls = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", _broadcast_from([None]))
    head_sources.on_main_process(FakeAccelerator(1, 2), lambda: calls.append("rank1"))
    head_sources.on_main_process(FakeAccelerator(0, 2), lambda: calls.append("rank0"))
    assert calls == ["rank0"]


def test_a_failed_check_raises_on_every_rank(monkeypatch):
    import accelerate.utils

    def failing():
        raise ValueError("task model has 3 layers, the base 2")

    with pytest.raises(ValueError, match="3 layers"):
        head_sources.on_main_process(FakeAccelerator(0, 1), failing)
    # The other rank never opens the task model and still raises the main process's error.
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", _broadcast_from([("ValueError", "3 layers")]))
    with pytest.raises(ValueError, match=r"\(on the main process\) 3 layers"):
        head_sources.on_main_process(FakeAccelerator(1, 2), pytest.fail)
