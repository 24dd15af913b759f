from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON, flip_indices, flip_pairs


def test_flip_pairs_are_the_official_coco_pairs() -> None:
    # The official DistilPose config lists these pairs; ours are derived from the names.
    expected = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
    assert flip_pairs(COCO_KEYPOINT_NAMES) == expected


def test_flip_indices_is_an_involution() -> None:
    idx = flip_indices(COCO_KEYPOINT_NAMES)
    assert [idx[i] for i in idx] == list(range(len(COCO_KEYPOINT_NAMES)))
    assert idx[0] == 0


def test_skeleton_is_zero_based_and_in_range() -> None:
    assert len(COCO_SKELETON) == 19
    assert all(0 <= i < 17 and 0 <= j < 17 for i, j in COCO_SKELETON)


def test_model_package_does_not_import_serving_stacks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, model, model.interfaces, model.keypoints\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'grpc', 'prometheus_client', 'starlette', 'pydantic', 'uvicorn')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
