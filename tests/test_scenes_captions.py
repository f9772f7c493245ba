"""The caption score of benchmarks/scenes_captions.py: word-for-word references, and objects in any order."""

from benchmark_scripts import script

score = script("scenes_captions").score


def test_exact_and_object_scores():
    refs = [["a small red circle left of a large blue square", "a large blue square right of a small red circle"]]
    assert score(["a large blue square right of a small red circle"], refs) == \
        {"exact_reference": 1.0, "objects_right": 1.0, "all_right": 1.0}
    assert score(["there is a large blue square right of a small red circle"], refs) == \
        {"exact_reference": 0.0, "objects_right": 1.0, "all_right": 1.0}  # another phrasing, the same scene
    assert score(["a large blue square left of a small red circle"], refs) == \
        {"exact_reference": 0.0, "objects_right": 1.0, "all_right": 0.0}  # relation wrong, objects right
    assert score(["a small blue circle left of a large red square"], refs)["objects_right"] == 0.0  # binding
    assert score([None], refs) == {"exact_reference": 0.0, "objects_right": 0.0, "all_right": 0.0}
