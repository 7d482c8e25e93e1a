"""The model travels packed (one vector + shapes) and decodes to exactly the tensors that were sent."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from radfed.federation.job import records
from radfed.federation.learning.training import model_to_arrays, new_model
from radfed.inference.model.taskspec import TaskSpec


def test_the_model_round_trips_through_two_arrays(planned_spec: TaskSpec) -> None:
    tensors = model_to_arrays(new_model(planned_spec))
    packed = records.pack_arrays(tensors)
    assert list(packed.keys()) == ["model", "shapes"]  # 2 objects in Flower's store, not one per tensor
    decoded = records.arrays(RecordDict({"arrays": packed}))
    assert len(decoded) == len(tensors) > 10
    for sent, received in zip(tensors, decoded, strict=True):
        assert received.shape == sent.shape and received.dtype == np.float32
        np.testing.assert_array_equal(received, sent)


def test_other_dtypes_go_one_array_each() -> None:
    tensors = [np.ones((2, 3), np.float32), np.arange(4, dtype=np.int64)]
    decoded = records.arrays(RecordDict({"arrays": records.pack_arrays(tensors)}))
    assert [a.dtype for a in decoded] == [np.float32, np.int64]
    np.testing.assert_array_equal(decoded[1], tensors[1])


def test_a_vector_that_does_not_fill_its_shapes_is_refused() -> None:
    record = ArrayRecord(
        {"model": Array(np.zeros(5, np.float32)), "shapes": Array(np.array([1, 2, 2, 2], dtype=np.int64))}
    )
    with pytest.raises(ValueError, match="5 packed values for shapes that hold 4"):
        records.arrays(RecordDict({"arrays": record}))
