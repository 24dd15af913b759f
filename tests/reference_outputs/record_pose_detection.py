"""Record MediaPipe's pose detector outputs for tests/model/test_pose_detector.py (run by hand).

Not a test and not part of the service: it needs LiteRT and MediaPipe, which the project never
installs. See README.md in this folder for the environments and commands. Two parts, each in its
own environment (MediaPipe 0.10.21 needs numpy < 2):

    python record_pose_detection.py litert --wheels WHEEL_DIR --out tests/reference_outputs
    python record_pose_detection.py mediapipe --out tests/reference_outputs

1. ``litert`` builds two 224x224 network inputs (PNG, lossless) from committed images and runs
   ``pose_detection.tflite`` (mediapipe 0.10.21 wheel) on them with LiteRT:
   posedet_astronaut.png  pose_astronaut.png (256x256) resized to 224 (PIL bilinear);
   posedet_skier.png      det_skier.png (320x212) letterboxed to 224: scaled by 0.7 (PIL
                          bilinear) into a zero canvas, 37 rows above, 38 below.
   The network input is png * 2/255 - 1. Writes pose_detection_litert.npz.
2. ``mediapipe`` runs MediaPipe's Pose solution (static images, model complexity 1, its graph
   ``pose_landmark_cpu``) on pose_astronaut.png and det_skier.png and keeps its
   ``pose_detection`` (score, face box, 4 keypoints in [0, 1] image units),
   ``pose_rect_from_detection`` (x, y, w, h in [0, 1] image units, rotation in radians) and
   ``pose_landmarks`` (33 x, y in [0, 1], visibility, presence). Writes pose_detection_mp.npz.
"""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MEMBER = "mediapipe/modules/pose_detection/pose_detection.tflite"
IMAGES = {"astronaut": "pose_astronaut.png", "skier": "det_skier.png"}


def litert(wheels: Path, out: Path) -> None:
    astronaut = Image.open(out / IMAGES["astronaut"]).convert("RGB")
    astronaut.resize((224, 224), Image.BILINEAR).save(out / "posedet_astronaut.png")
    skier = Image.open(out / IMAGES["skier"]).convert("RGB")  # 320x212
    canvas = Image.new("RGB", (224, 224))
    canvas.paste(skier.resize((224, 149), Image.BILINEAR), (0, 37))
    canvas.save(out / "posedet_skier.png")

    (wheel,) = wheels.glob("mediapipe-0.10.21-*.whl")
    data = zipfile.ZipFile(wheel).read(MEMBER)
    print(MEMBER, hashlib.sha256(data).hexdigest())
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    outs = {d["name"]: d["index"] for d in interp.get_output_details()}
    results = {}
    for key in ("astronaut", "skier"):
        pixels = np.asarray(Image.open(out / f"posedet_{key}.png").convert("RGB"))
        x = pixels.astype(np.float32)[None] * np.float32(2.0 / 255.0) - np.float32(1.0)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        results[f"{key}_boxes"] = interp.get_tensor(outs["Identity"])[0]  # (2254, 12)
        results[f"{key}_scores"] = interp.get_tensor(outs["Identity_1"])[0, :, 0]  # (2254,)
    np.savez_compressed(out / "pose_detection_litert.npz", **results)


def mediapipe(out: Path) -> None:
    from mediapipe.python.solution_base import SolutionBase
    from mediapipe.python.solutions import pose

    solution = SolutionBase(
        binary_graph_path=pose._BINARYPB_FILE_PATH,
        side_inputs={
            "model_complexity": 1,
            "smooth_landmarks": False,
            "enable_segmentation": False,
            "smooth_segmentation": False,
            "use_prev_landmarks": False,
        },
        calculator_params={
            "posedetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": 0.5,
        },
        outputs=["pose_landmarks", "pose_detection", "pose_rect_from_detection"],
    )
    results = {}
    for key, name in IMAGES.items():
        image = np.asarray(Image.open(out / name).convert("RGB"))
        found = solution.process({"image": image})
        detection = found.pose_detection.location_data
        box = detection.relative_bounding_box
        results[f"{key}_det_score"] = np.array(found.pose_detection.score, np.float32)
        results[f"{key}_det_box"] = np.array([box.xmin, box.ymin, box.width, box.height])
        results[f"{key}_det_keypoints"] = np.array(
            [[k.x, k.y] for k in detection.relative_keypoints]
        )
        rect = found.pose_rect_from_detection
        results[f"{key}_roi"] = np.array(
            [rect.x_center, rect.y_center, rect.width, rect.height, rect.rotation]
        )
        results[f"{key}_landmarks"] = np.array(
            [[m.x, m.y, m.visibility, m.presence] for m in found.pose_landmarks.landmark]
        )
    np.savez_compressed(
        out / "pose_detection_mp.npz", **{k: v.astype(np.float32) for k, v in results.items()}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("litert", "mediapipe"))
    parser.add_argument("--wheels", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.part == "litert":
        litert(args.wheels, args.out)
    else:
        mediapipe(args.out)


if __name__ == "__main__":
    main()
