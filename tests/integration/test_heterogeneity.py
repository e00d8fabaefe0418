"""Each local-training algorithm end to end: 10 real node processes, MNIST-5k,
Dirichlet(0.3) label skew, 20 rounds; none may fall more than 0.05 below FedAvg."""
from pathlib import Path

import pytest

from orchestrator.scenario import load
from tests.integration.harness import Federation

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "heterogeneity.toml"


def _run(tmp_path_factory, algorithm: str) -> dict:
    s = load(SCENARIO, [f'training.algorithm="{algorithm}"', "output.live=false", "output.plot=false"])
    assert s.num_nodes == 10 and s.federation.rounds == 20 and s.data.alpha == 0.3
    with Federation(s, tmp_path_factory.mktemp(algorithm)) as fed:
        summary = fed.wait(timeout=300)
    assert summary["rounds_completed"] == 20
    return summary


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    return _run(tmp_path_factory, "fedavg")


def test_fedavg_learns_under_label_skew(fedavg):
    assert fedavg["final_accuracy"] > 0.8


SLOW = pytest.mark.slow  # ~21 s each; beyond the default run's budget: ./launch.sh test -m slow


@pytest.mark.parametrize("algorithm", ["fedprox", "feddyn", pytest.param("fedrs", marks=SLOW),
                                       pytest.param("fedsam", marks=SLOW), pytest.param("fedspeed", marks=SLOW)])
def test_algorithm_keeps_up_with_fedavg(tmp_path_factory, fedavg, algorithm):
    summary = _run(tmp_path_factory, algorithm)
    assert summary["final_accuracy"] >= fedavg["final_accuracy"] - 0.05, (summary["final_accuracy"],
                                                                         fedavg["final_accuracy"])
