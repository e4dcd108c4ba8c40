import pytest

from federated.fakes import task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    yield from task_identity()
