"""Test-wide settings: tiny models run fastest, and most predictably, on one torch thread; Ray clusters
the tests start run with the settings the image and the README's `serve run` give (deploy.cluster_env)."""

import pytest
import torch

from deploy.cluster_env import cluster_env


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def served_cluster_env():
    with cluster_env():
        yield
