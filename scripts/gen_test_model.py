#!/usr/bin/env python3
"""Generate the small ONNX test model that imitates NVIDIA Retail Object Recognition v2.0.

Writes
    agent-config/models/retail-test.onnx          the model
    agent-config/models/retail-test.labels.txt    one label per line, line index = `probs` column

The model has the interface of the real v2.0 model (see the project spec NVIDIA_MODELS.md)
at a fraction of its size, so that the agent can be tested end to end without
the real weights:
    input       float32 [batch, 3, 224, 224], NCHW, RGB, dynamic batch
    embeddings  float32 [batch, 128], not L2-normalised
    probs       float32 [batch, num_labels], a softmax over the labels

Its feature extractor has fixed, seeded random weights; the design (not the
weights) is tuned to the synthetic products of scripts/gen_synthetic.py:
    (a) grid     AveragePool to a 4x4 grid of mean colours                    48
    (b) color    soft colour histogram of the central 70% of the image:
                 relu(1 - |y - q_k|^2 / r^2) averaged over pixels, for 48
                 random prototype colours q_k, where y is an opponent colour
                 space with luminance down-weighted, so that the neutral grey
                 backgrounds and brightness changes matter little            48
    (c) texture  two strided 3x3 convs with zero-mean random filters, ReLU,
                 GlobalAveragePool: edge and stripe statistics                32
The 128 features are standardised with statistics of the reference images,
weighted per branch, scaled (embedding norms are about 10, deliberately not 1)
and rotated by a random orthogonal matrix; all of this is one Gemm giving the
embedding. The classifier head is
    probs = Softmax(T * L2normalise(embeddings) @ W^T)
where row k of W is the L2-normalised mean of the normalised reference
embeddings of label k (computed with onnxruntime) and T the temperature.

Preprocessing the model expects (the agent must do exactly this): convert to RGB,
resize to 224x224 ignoring aspect with Pillow's BILINEAR filter (antialiased
convolution), x / 255, subtract mean (0.48145466, 0.4578275, 0.40821073) and
divide by std 0.26857 per channel, NCHW with channel 0 = R.

Reads testdata/synthetic/{refs,queries} (run scripts/gen_synthetic.py first). At
the end it validates the saved model and prints top-1 accuracy on the queries:
nearest neighbour (L2 between normalised embeddings) against the first N
references per label (sorted file names), and the classifier head.

The output is byte-for-byte deterministic on a given platform: seeded weights,
fixed producer and doc strings, statistics from single-threaded onnxruntime on CPU.

Usage: python3 scripts/gen_test_model.py [--out REPO_ROOT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 1729

OPSET = 17
IR_VERSION = 8  # loadable by ONNX Runtime 1.17 and newer
INPUT_SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26857, 0.26857, 0.26857])

GRID = 4  # (a) the colour grid is GRID x GRID cells
COLOR_BINS = 48  # (b) number of prototype colours
COLOR_BIN_RADIUS = 0.25  # (b) in opponent space, 0..1 RGB units
COLOR_LUMA_WEIGHT = 0.3  # (b) luminance weight relative to chroma
COLOR_REGION = 0.7  # (b) central fraction of each side that is histogrammed
TEXTURE_CHANNELS = (16, 32)  # (c) output channels of the two 3x3 convs
BRANCH_SIZES = {"grid": 3 * GRID * GRID, "color": COLOR_BINS, "texture": TEXTURE_CHANNELS[1]}
# Relative weight of each branch after standardisation: the colour histogram is
# the most robust to rotation and cropping.
BRANCH_WEIGHTS = {"grid": 0.5, "color": 1.0, "texture": 0.5}
# Standard deviations below this fraction of their branch's median are raised to
# it, so that rarely active features are not amplified into noise.
STD_FLOOR = 0.3
EMBEDDING_DIM = 128
# Overall embedding scale: keeps norms well away from 1 (about 5 to 25), so that an
# agent which forgets to L2-normalise is caught by its tests.
EMBEDDING_SCALE = 10.0
TEMPERATURE = 20.0
NORM_EPS = 1e-12

NN_REFS_PER_LABEL = (1, 5, 10)
MIN_NN5_ACCURACY = 0.97

# 0..1 RGB -> (luminance * COLOR_LUMA_WEIGHT, red-green, yellow-blue), orthonormal
# apart from the luminance weight.
OPPONENT = np.array([
    [COLOR_LUMA_WEIGHT / np.sqrt(3)] * 3,
    [1 / np.sqrt(2), -1 / np.sqrt(2), 0],
    [1 / np.sqrt(6), 1 / np.sqrt(6), -2 / np.sqrt(6)],
])


# --------------------------------------------------------------------------- data


def preprocess(path: Path) -> np.ndarray:
    """Image file -> float32 [3, 224, 224] exactly as the agent preprocesses it."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    return ((x - MEAN.astype(np.float32)) / STD.astype(np.float32)).transpose(2, 0, 1)


def load_set(root: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """root/<label>/*.jpg -> (tensors [n,3,224,224], label index, rank within the label)."""
    tensors, classes, ranks = [], [], []
    for k, label in enumerate(labels):
        for rank, path in enumerate(sorted((root / label).glob("*.jpg"))):
            tensors.append(preprocess(path))
            classes.append(k)
            ranks.append(rank)
    return np.stack(tensors), np.array(classes), np.array(ranks)


# ------------------------------------------------------------------------ weights


def feature_weights(seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights of the feature extractor (one random stream per branch)."""
    color_rng, texture_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 1]).spawn(2))

    # (b) y = OPPONENT @ rgb, with rgb = x * STD + MEAN undoing the input normalisation.
    to_opponent_w = OPPONENT * STD[None, :]
    to_opponent_b = OPPONENT @ MEAN
    # relu(1 - |y - q|^2 / r^2) = relu(y . 2q/r^2 - |y|^2 / r^2 + 1 - |q|^2 / r^2):
    # one 1x1 conv over the 6 channels [y, y^2].
    prototypes = color_rng.uniform(0, 1, size=(COLOR_BINS, 3)) @ OPPONENT.T
    r2 = COLOR_BIN_RADIUS ** 2
    bins_w = np.concatenate([2 * prototypes / r2, np.full((COLOR_BINS, 3), -1 / r2)], axis=1)
    bins_b = 1 - (prototypes ** 2).sum(axis=1) / r2

    # (c) Zero-mean first-layer filters respond to edges, not to flat colour.
    c1, c2 = TEXTURE_CHANNELS
    tex1 = texture_rng.normal(size=(c1, 3, 3, 3))
    tex1 -= tex1.mean(axis=(2, 3), keepdims=True)
    tex2 = texture_rng.normal(size=(c2, c1, 3, 3)) / np.sqrt(c1 * 9)

    return {
        "to_opponent_w": to_opponent_w.reshape(3, 3, 1, 1), "to_opponent_b": to_opponent_b,
        "color_bins_w": bins_w.reshape(COLOR_BINS, 6, 1, 1), "color_bins_b": bins_b,
        "tex1_w": tex1, "tex1_b": np.zeros(c1),
        "tex2_w": tex2, "tex2_b": np.zeros(c2),
    }


def projection_from_features(features: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, weight per branch, scale and rotate, folded into Gemm weights [dim, 128] and bias."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    scale, start = np.empty_like(mean), 0
    for name, size in BRANCH_SIZES.items():
        branch = slice(start, start + size)
        floor = STD_FLOOR * np.median(std[branch])
        scale[branch] = EMBEDDING_SCALE * BRANCH_WEIGHTS[name] / np.sqrt(size) / np.maximum(std[branch], floor)
        start += size
    dim = features.shape[1]
    # Orthonormal columns (QR of a Gaussian matrix) preserve distances.
    rotation, _ = np.linalg.qr(np.random.default_rng([seed, 2]).normal(size=(EMBEDDING_DIM, dim)))
    proj_w = scale[:, None] * rotation.T
    proj_b = -(mean * scale) @ rotation.T
    return proj_w, proj_b


# -------------------------------------------------------------------------- graph


class GraphBuilder:
    """Collects nodes and initializers; every node is named after its single output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def conv(self, x: str, weights: dict[str, np.ndarray], name: str, **attrs) -> str:
        w, b = self.const(f"{name}_w", weights[f"{name}_w"]), self.const(f"{name}_b", weights[f"{name}_b"])
        return self.op("Conv", [x, w, b], name, **attrs)


def add_features(g: GraphBuilder, weights: dict[str, np.ndarray], x: str) -> str:
    """Append the feature extractor to the graph; returns its [batch, 128] output."""
    cell = INPUT_SIZE // GRID
    grid = g.op("AveragePool", [x], "grid_pool", kernel_shape=[cell, cell], strides=[cell, cell])
    grid = g.op("Flatten", [grid], "grid_features", axis=1)

    border = round(INPUT_SIZE * (1 - COLOR_REGION) / 2)
    center = g.op("Slice", [x, g.const("center_starts", [border, border], np.int64),
                            g.const("center_ends", [INPUT_SIZE - border] * 2, np.int64),
                            g.const("center_axes", [2, 3], np.int64)], "center")
    opponent = g.conv(center, weights, "to_opponent", kernel_shape=[1, 1])
    squared = g.op("Mul", [opponent, opponent], "opponent_squared")
    color = g.op("Concat", [opponent, squared], "color_bins_input", axis=1)
    color = g.conv(color, weights, "color_bins", kernel_shape=[1, 1])
    color = g.op("Relu", [color], "color_bins_relu")
    color = g.op("GlobalAveragePool", [color], "color_pool")
    color = g.op("Flatten", [color], "color_features", axis=1)

    texture = x
    for name in ("tex1", "tex2"):
        texture = g.conv(texture, weights, name, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        texture = g.op("Relu", [texture], f"{name}_relu")
    texture = g.op("GlobalAveragePool", [texture], "texture_pool")
    texture = g.op("Flatten", [texture], "texture_features", axis=1)

    return g.op("Concat", [grid, color, texture], "features", axis=1)


def add_l2_normalise(g: GraphBuilder, x: str) -> str:
    norm = g.op("ReduceL2", [x], f"{x}_norm", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const(f"{x}_norm_eps", NORM_EPS)], f"{x}_norm_clamped")
    return g.op("Div", [x, norm], f"{x}_normalised")


def build_model(weights: dict[str, np.ndarray], projection: tuple[np.ndarray, np.ndarray] | None = None,
                class_weights: np.ndarray | None = None) -> onnx.ModelProto:
    """Build the model up to `features`, or `embeddings`, or `embeddings` and `probs`."""
    g = GraphBuilder()
    features = add_features(g, weights, "input")
    outputs = [helper.make_tensor_value_info(features, TensorProto.FLOAT, ["batch", sum(BRANCH_SIZES.values())])]
    if projection is not None:
        proj_w, proj_b = projection
        emb = g.op("Gemm", [features, g.const("proj_w", proj_w), g.const("proj_b", proj_b)], "embeddings")
        outputs = [helper.make_tensor_value_info(emb, TensorProto.FLOAT, ["batch", EMBEDDING_DIM])]
        if class_weights is not None:
            logits = g.op("Gemm", [add_l2_normalise(g, emb), g.const("class_w", class_weights)], "logits",
                          transB=1, alpha=TEMPERATURE)
            probs = g.op("Softmax", [logits], "probs", axis=1)
            outputs.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, ["batch", len(class_weights)]))

    graph = helper.make_graph(
        g.nodes, "retail_test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE])],
        outputs, initializer=g.initializers,
        doc_string="Seeded random colour/texture features and a cosine classifier over synthetic products.",
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="retail-agent scripts/gen_test_model.py", producer_version="1",
        doc_string="Test stand-in for NVIDIA Retail Object Recognition v2.0; not a real recogniser.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------- numerics


def session_for(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # fixed summation order, reproducible statistics
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, output: str, batch: int = 32) -> np.ndarray:
    session = session_for(model)
    chunks = [session.run([output], {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(chunks).astype(np.float64)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)


def nn_accuracy(refs: np.ndarray, ref_classes: np.ndarray, queries: np.ndarray, query_classes: np.ndarray) -> float:
    """Top-1 accuracy of exact nearest-neighbour search by L2 between normalised embeddings."""
    refs, queries = normalise_rows(refs), normalise_rows(queries)
    dist = ((queries[:, None, :] - refs[None, :, :]) ** 2).sum(axis=2)
    return float((ref_classes[dist.argmin(axis=1)] == query_classes).mean())


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="repository root to read from and write into")
    args = parser.parse_args()

    synthetic = args.out / "testdata" / "synthetic"
    refs_dir, queries_dir = synthetic / "refs", synthetic / "queries"
    labels = sorted(p.name for p in refs_dir.iterdir() if p.is_dir()) if refs_dir.is_dir() else []
    if not labels or not queries_dir.is_dir():
        print(f"error: no synthetic images under {synthetic}; run scripts/gen_synthetic.py first", file=sys.stderr)
        return 1
    refs, ref_classes, ref_ranks = load_set(refs_dir, labels)
    queries, query_classes, _ = load_set(queries_dir, labels)

    # Build in stages: reference statistics of one stage give the weights of the next.
    weights = feature_weights(SEED)
    projection = projection_from_features(run(build_model(weights), refs, "features"), SEED)
    ref_emb = run(build_model(weights, projection), refs, "embeddings")
    centroids = np.stack([normalise_rows(ref_emb[ref_classes == k]).mean(axis=0) for k in range(len(labels))])
    model = build_model(weights, projection, normalise_rows(centroids))

    model_dir = args.out / "agent-config" / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    model_path, labels_path = model_dir / "retail-test.onnx", model_dir / "retail-test.labels.txt"
    onnx.save_model(model, model_path)
    labels_path.write_text("".join(f"{label}\n" for label in labels))

    # Validate the saved file as the agent will use it: outputs by name, any batch size.
    session = session_for(model_path)
    query_emb, query_probs = session.run(["embeddings", "probs"], {"input": queries})
    single_emb, single_probs = session.run(["embeddings", "probs"], {"input": queries[:1]})
    assert query_emb.shape == (len(queries), EMBEDDING_DIM), query_emb.shape
    assert query_probs.shape == (len(queries), len(labels)), query_probs.shape
    assert np.allclose(query_probs.sum(axis=1), 1, atol=1e-5), "probs rows must sum to 1"
    assert np.allclose(single_emb, query_emb[:1], rtol=1e-4, atol=1e-4), "batch size changes embeddings"
    assert np.allclose(single_probs, query_probs[:1], atol=1e-5), "batch size changes probs"

    query_emb = query_emb.astype(np.float64)
    nn = {n: nn_accuracy(ref_emb[ref_ranks < n], ref_classes[ref_ranks < n], query_emb, query_classes)
          for n in NN_REFS_PER_LABEL}
    classifier = float((query_probs.argmax(axis=1) == query_classes).mean())
    # Queries are meant to be harder than references: compare their similarity to
    # their own class centroid (the classifier weights).
    class_w = normalise_rows(centroids)
    ref_sim = (normalise_rows(ref_emb) * class_w[ref_classes]).sum(axis=1).mean()
    query_sim = (normalise_rows(query_emb) * class_w[query_classes]).sum(axis=1).mean()

    print(f"model:  {model_path} ({model_path.stat().st_size} bytes, opset {OPSET}, ir_version {IR_VERSION})")
    print(f"labels: {labels_path} ({len(labels)} labels)")
    print(f"top-1 accuracy on {len(queries)} queries against {len(refs)} refs:")
    for n, accuracy in nn.items():
        print(f"  nearest neighbour, first {n:2d} refs/label: {accuracy:.4f}")
    print(f"  classifier head (probs):              {classifier:.4f}")
    print(f"mean cosine similarity to own class centroid: refs {ref_sim:.4f}, queries {query_sim:.4f}")
    if nn[5] < MIN_NN5_ACCURACY:
        print(f"error: nearest-neighbour accuracy with 5 refs/label is below {MIN_NN5_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
