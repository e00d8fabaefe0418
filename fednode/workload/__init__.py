"""The learning workload: models, datasets and their split across nodes.

Shared by the client nodes (local training on their shard) and the
orchestrator (evaluation on the held-out test split, defenses that run the
model's ``features``). Everything is local: no download ever happens.
"""
from fednode.workload.datasets import DATASETS, Dataset, dataset_spec, load_dataset
from fednode.workload.models import MODELS, batched_features, build_model, stacked_state
from fednode.workload.partition import SCHEMES, partition, shard_for

__all__ = [
    "DATASETS",
    "Dataset",
    "MODELS",
    "SCHEMES",
    "batched_features",
    "build_model",
    "dataset_spec",
    "load_dataset",
    "partition",
    "shard_for",
    "stacked_state",
]
