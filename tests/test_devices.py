"""``--device``: names resolved to torch devices, and the ones this machine lacks refused early.

torch.cuda is patched where a test needs a GPU or its absence, so each test means the same on a
CPU-only machine and on a GPU one.
"""

from __future__ import annotations

import pytest
import torch

from helpers import one_thread
from margin.devices import resolve_device
from margin.errors import MarginError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" Auto ") == torch.device("cpu")


def test_auto_is_the_gpu_when_torch_sees_one(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_explicit_names_and_torch_devices_pass_through(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_fix(no_gpu):
    with pytest.raises(MarginError, match=r"'cuda'.*no CUDA GPU.*--device cpu"):
        resolve_device("cuda")


def test_a_gpu_number_past_the_last_is_refused_with_the_valid_range(two_gpus):
    with pytest.raises(MarginError, match=r"2 CUDA GPU\(s\).*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "", "cuda:x"])
def test_unknown_names_are_refused(name):
    with pytest.raises(MarginError, match="unknown device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["meta", "xla"])
def test_devices_margin_does_not_run_on_are_refused(name):
    with pytest.raises(MarginError, match="not supported"):
        resolve_device(name)


def test_configs_refuse_a_missing_device_when_built(no_gpu):
    from margin.evaluation.grid import EvalConfig, check_config
    from margin.training.config import TrainConfig

    with pytest.raises(MarginError, match="no CUDA GPU"):
        TrainConfig(device="cuda")
    with pytest.raises(MarginError, match="no CUDA GPU"):
        check_config(EvalConfig(data="questions.tsv", device="cuda"))
    assert TrainConfig(device="cpu").device == "cpu"


def test_a_ray_worker_loads_its_encoder_where_it_can_run(no_gpu, st_model):
    """Without a GPU given to the worker, its encoder copy is on the CPU, and encodes alike."""
    from margin.retrieval.distributed import worker_encoder
    from margin.retrieval.encoders import load_encoder

    with one_thread():
        driver = load_encoder(st_model, role="passage")
        worker = worker_encoder(dict(driver.spec))
        assert worker.device == torch.device("cpu")
        assert worker.fingerprint == driver.fingerprint
        queries = ["paris", "the capital of germany"]
        assert (worker.encode_queries(queries) == driver.encode_queries(queries)).all()


def test_data_parallel_training_refuses_one_numbered_gpu_for_every_process(two_gpus, tmp_path):
    """Under torchrun each process takes the GPU of its LOCAL_RANK; cuda:1 would stack them."""
    from margin.evaluation.examples import Example
    from margin.training.config import TrainConfig
    from margin.training.data_parallel import World
    from margin.training.train import train

    config = TrainConfig(steps=1, device="cuda:1")
    with pytest.raises(MarginError, match="all 2 processes on one GPU"):
        train(None, [Example("1", "q", ("a",))], tmp_path / "run", config,  # type: ignore[arg-type]
              world=World(0, 2))
    assert not (tmp_path / "run").exists()
