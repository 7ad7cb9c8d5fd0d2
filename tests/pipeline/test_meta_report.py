"""The report's meta tables from hand-made ``meta`` payloads: verdicts, unknown payloads, wide class sets."""

from longtail.pipeline.report.meta import BARELY, meta_sections, movement


def _cb(scales, classes=4):
    rows = [[None] * classes if s is None else [0.01 * c for c in range(classes)] for s in scales]
    return {"method": "meta-cb", "meta_source": "val", "meta_rows": 40, "meta_start_epoch": 1,
            "meta_loss": [None] + [0.5] * (len(scales) - 1), "eps_scale": scales, "eps_class_mean": rows}


def test_verdicts_follow_the_largest_movement_of_the_meta_stage():
    assert movement(_cb([None, BARELY / 2, BARELY / 3])) == ("mean |eps| / mean w", BARELY / 2, "barely moved")
    assert movement(_cb([None, BARELY / 2, BARELY * 2]))[2] == "moved"
    assert movement(_cb([None, None]))[2] == "no meta step"
    lad = {"method": "metalad", "lambda_moved": [None, 0.004], "lambda_mean": {"proportion": [None, 1.004]}}
    assert movement(lad) == ("max |lambda - lambda_0|", 0.004, "barely moved")
    assert movement({"method": "other", "meta_loss": [0.3]}) == ("n/a", None, "n/a")  # a payload we do not know


def test_tables_and_wide_class_sets():
    assert meta_sections({"methods": {}}) == []
    metrics = {"class_names": [f"k{i}" for i in range(20)],
               "meta": {"meta-cb": _cb([None, 0.2], classes=20),
                        "other": {"method": "meta-cala", "meta_rows": 12, "meta_source": "val",
                                  "meta_start_epoch": 0, "meta_loss": [0.9, 0.7]}}}
    summary, per_class = meta_sections(metrics)
    rows = {r[0]: r for r in summary["rows"]}
    assert rows["meta-cb"][2] == "2" and rows["meta-cb"][-1] == "moved" and rows["other"][-1] == "n/a"
    assert rows["other"][3:5] == ["0.9", "0.7"]
    assert per_class["columns"] == ["Method"] + [f"k{i}" for i in (0, 1, 2, 3, 4, 5, 14, 15, 16, 17, 18, 19)]
    assert per_class["rows"][0][1:3] == ["0", "0.01"] and per_class["rows"][0][-1] == "0.19"
