"""TensorHistogram exports the buckets prometheus-client's own Histogram exports for the same
values (values equal to a bound, infinities and NaN included), accumulated over calls."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from tokenreward_service.metrics import TensorHistogram

BOUNDS = (-1.0, -0.125, 0.0, 0.125, 1.0, 4.0)


def _samples(collector: object) -> dict[str, float]:
    (family,) = collector.collect()  # type: ignore[attr-defined]
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for s in family.samples
        if s.name.endswith("_bucket")
    }


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*BOUNDS, math.nan, math.inf, -math.inf, 1e9]),
            st.floats(-8, 8, width=32),
        ),
        max_size=60,
    ),
    st.integers(1, 3),
)
def test_same_buckets_and_sum_as_prometheus_client(values: list[float], calls: int) -> None:
    ours = TensorHistogram("h", "doc", BOUNDS)
    reference = Histogram("h", "doc", buckets=BOUNDS, registry=CollectorRegistry())
    finite = [v for v in values if math.isfinite(v)]
    for part in range(calls):  # several requests' worth, accumulated
        chunk = values[part::calls]
        ours.observe_tensor(torch.tensor(chunk, dtype=torch.float32))
    for value in finite:
        reference.observe(float(torch.tensor(value, dtype=torch.float32)))
    got, want = _samples(ours), _samples(reference)
    assert {k: v for k, v in got.items() if "_bucket" in k} == {
        k: v for k, v in want.items() if "_bucket" in k
    }
    # (With a negative bound prometheus-client leaves _sum out of the export: compare the total.)
    total = math.fsum(float(torch.tensor(v, dtype=torch.float32)) for v in finite)
    assert math.isclose(ours.total, total, rel_tol=1e-9, abs_tol=1e-6)
