"""The accuracy gate: COCO mAP@0.5 and mAP@0.5:0.95 of each engine against thresholds.yaml.

One evaluation per (model, backend, precision) per session; one test item per metric.
"""

from __future__ import annotations

import pytest

from conftest import VERDICT_PROPERTY, skip_unless_runnable

pytestmark = pytest.mark.accuracy


@pytest.mark.parametrize("metric", ["mAP50", "mAP"])
def test_accuracy(gate, accuracy_case, metric, record_property):
    skip_unless_runnable(gate, accuracy_case)
    verdict = gate.check_accuracy(accuracy_case, metric)
    result = gate.evaluate(accuracy_case)
    record_property(VERDICT_PROPERTY, {**verdict.as_row(), **gate.provenance(accuracy_case)})
    record_property("images", result.dataset["images"])
    rates = result.images_per_s()
    record_property("images_per_s", rates["whole_loop"])
    if metric == "mAP":  # once per case
        print(f"\n{accuracy_case.id}: detection loop " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
              + f" images/s over {result.dataset['images']} images; {result.times.waits()}")
    if verdict.status == "no target" and gate.options.strict:
        pytest.fail(f"--strict: {verdict.message()}", pytrace=False)
    assert verdict.passed, verdict.message()
