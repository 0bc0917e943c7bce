"""The end-of-run summary the gates print (``report.summary_lines``)."""

from __future__ import annotations

from rtmbench.report import summary_lines

NO_TRT = "backend tensorrt unavailable here: tensorrt is not installed"
NO_IGIE = "backend igie unavailable here: tvm is not installed"


def test_not_run_is_one_line_per_reason():
    not_run = sorted([(f"test_{gate}[m-{backend}-{precision}-bs32{metric}]", why)
                      for backend, why in (("tensorrt", NO_TRT), ("igie", NO_IGIE))
                      for precision in ("fp16", "fp32")
                      for gate, metric in (("accuracy", "-mAP"), ("accuracy", "-mAP50"), ("throughput", ""))]
                     + [("m-openvino-fp16", "backend openvino cannot run fp16 on This CPU")])
    assert len(not_run) == 13
    assert summary_lines([], not_run) == [
        "not run:",
        "  m-openvino-fp16: backend openvino cannot run fp16 on This CPU",
        f"  {NO_IGIE} (6 items)",
        f"  {NO_TRT} (6 items)",
    ]
