"""deploy.cluster_env: the Ray settings the tests, the benchmarks, the image and the README start Ray with."""

import os

import pytest

from deploy.cluster_env import CLUSTER_ENV, cluster_env


@pytest.fixture
def bare_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)


def test_sets_each_variable_for_the_block_and_removes_it_after(bare_env):
    with cluster_env():
        assert {name: os.environ.get(name) for name in CLUSTER_ENV} == CLUSTER_ENV
    assert not any(name in os.environ for name in CLUSTER_ENV)


def test_keeps_a_value_the_caller_set(bare_env, monkeypatch):
    """RAY_SERVE_PROXY_USE_GRPC=0 in the caller's environment opts out."""
    name = next(iter(CLUSTER_ENV))
    monkeypatch.setenv(name, "0")
    with cluster_env():
        assert os.environ[name] == "0"
    assert os.environ[name] == "0"


def test_removes_the_variables_when_the_block_raises(bare_env):
    with pytest.raises(RuntimeError), cluster_env():
        raise RuntimeError("the cluster did not start")
    assert not any(name in os.environ for name in CLUSTER_ENV)
