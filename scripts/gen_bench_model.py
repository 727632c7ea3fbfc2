#!/usr/bin/env python3
"""Generate an ONNX model of realistic compute for `retail-agent bench`.

Writes into OUT (default: target/bench-model/ under the repository root)
    retail-bench.onnx          the model (not committed: regenerate it)
    retail-bench.labels.txt    315 labels, line index = `probs` column
    retail-bench.toml          its manifest, for `retail-agent bench --model-manifest`

The bundled test model (scripts/gen_test_model.py) costs a few MFLOPs per
image, so it cannot show how the agent behaves when inference dominates.
This one has the interface of NVIDIA Retail Object Recognition (see
agent-config/models/) and the compute of a small ResNet:
    input       float32 [batch, 3, 224, 224], NCHW, RGB, dynamic batch
    trunk       7x7/2 conv, 3x3/2 max pool, then four stages of two basic
                residual blocks (3x3 convs, ReLU; 1x1/2 projection where a
                stage halves the resolution), widths 40, 80, 160, 320
    embeddings  float32 [batch, DIM] (default 448, as v2.0), a Gemm on the
                globally pooled features; not L2-normalised
    probs       float32 [batch, 315], a softmax classifier on the same features
About 0.73 G multiply-adds (1.5 GFLOPs) per image; the script prints the
exact count. The weights are seeded random numbers (He initialisation, no
training): the model recognises nothing, it only costs what a real one costs.

The output is deterministic: seeded weights, fixed producer and doc strings.
Needs onnx and numpy (scripts/requirements.txt); when onnxruntime is
installed too, the saved model is run once as a check.

Usage: python3 scripts/gen_bench_model.py [--out DIR] [--dim N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 4242

OPSET = 17
IR_VERSION = 8  # loadable by ONNX Runtime 1.17 and newer
INPUT_SIZE = 224
STEM_WIDTH = 40
STAGE_WIDTHS = (40, 80, 160, 320)
BLOCKS_PER_STAGE = 2
NUM_LABELS = 315
DEFAULT_DIM = 448
MAX_BATCH = 16
MODEL_ID = "retail-bench-resnet"
NAME = "retail-bench"


class GraphBuilder:
    """Collects nodes and initializers, counts multiply-adds; nodes are named after their output."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.macs = 0
        self.params = 0

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value, dtype=np.float32)
        self.params += value.size
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int, stride: int, out_side: int) -> str:
        """A k x k convolution with He-initialised weights and zero bias, 'same' padding."""
        w = self.rng.normal(0.0, np.sqrt(2.0 / (c_in * k * k)), size=(c_out, c_in, k, k))
        self.macs += out_side * out_side * c_out * c_in * k * k
        pad = k // 2
        return self.op("Conv", [x, self.const(f"{name}_w", w), self.const(f"{name}_b", np.zeros(c_out))], name,
                       kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad])

    def dense(self, x: str, name: str, n_in: int, n_out: int) -> str:
        w = self.rng.normal(0.0, np.sqrt(1.0 / n_in), size=(n_in, n_out))
        self.macs += n_in * n_out
        return self.op("Gemm", [x, self.const(f"{name}_w", w), self.const(f"{name}_b", np.zeros(n_out))], name)


def basic_block(g: GraphBuilder, x: str, name: str, c_in: int, c_out: int, stride: int, out_side: int) -> str:
    """relu(conv3x3(relu(conv3x3(x))) + shortcut(x)), the shortcut a 1x1 projection when the shape changes."""
    y = g.conv(x, f"{name}_conv1", c_in, c_out, 3, stride, out_side)
    y = g.op("Relu", [y], f"{name}_relu1")
    y = g.conv(y, f"{name}_conv2", c_out, c_out, 3, 1, out_side)
    shortcut = x if stride == 1 and c_in == c_out else g.conv(x, f"{name}_proj", c_in, c_out, 1, stride, out_side)
    y = g.op("Add", [y, shortcut], f"{name}_add")
    return g.op("Relu", [y], f"{name}_out")


def build_model(dim: int) -> tuple[onnx.ModelProto, int, int]:
    """The model, its multiply-adds per image and its parameter count."""
    g = GraphBuilder(SEED)
    side = INPUT_SIZE // 2
    x = g.conv("input", "stem", 3, STEM_WIDTH, 7, 2, side)
    x = g.op("Relu", [x], "stem_relu")
    side //= 2
    x = g.op("MaxPool", [x], "stem_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = STEM_WIDTH
    for s, width in enumerate(STAGE_WIDTHS):
        for b in range(BLOCKS_PER_STAGE):
            stride = 2 if s > 0 and b == 0 else 1
            if stride == 2:
                side //= 2
            x = basic_block(g, x, f"stage{s + 1}_block{b + 1}", c_in, width, stride, side)
            c_in = width
    x = g.op("GlobalAveragePool", [x], "pool")
    features = g.op("Flatten", [x], "features", axis=1)
    embeddings = g.dense(features, "embeddings", c_in, dim)
    logits = g.dense(features, "logits", c_in, NUM_LABELS)
    probs = g.op("Softmax", [logits], "probs", axis=1)

    graph = helper.make_graph(
        g.nodes, "retail_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info(embeddings, TensorProto.FLOAT, ["batch", dim]),
         helper.make_tensor_value_info(probs, TensorProto.FLOAT, ["batch", NUM_LABELS])],
        initializer=g.initializers,
        doc_string="ResNet-like trunk with seeded random weights: realistic compute, no recognition.",
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="retail-agent scripts/gen_bench_model.py", producer_version="1",
        doc_string="Benchmark model of realistic compute for retail-agent bench; not a real recogniser.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model, g.macs, g.params


def manifest(dim: int, macs: int) -> str:
    return f"""# Generated by scripts/gen_bench_model.py (not committed): a model of
# realistic compute for `retail-agent bench --model-manifest`. ResNet-like
# trunk, {macs / 1e9:.2f} G multiply-adds ({2 * macs / 1e9:.2f} GFLOPs) per image, seeded
# random weights: it costs what a real model costs and recognises nothing.
id = "{MODEL_ID}"
description = "Generated benchmark model (ResNet-like, random weights, {dim}-d embedding, {NUM_LABELS} classes)"
onnx = "{NAME}.onnx"
max_batch = {MAX_BATCH}

[input]
name = "input"
width = {INPUT_SIZE}
height = {INPUT_SIZE}

[preprocess]
color_order = "rgb"
scale = 0.00392156862745098
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
resize = {{ mode = "stretch" }}
filter = "bilinear"

[embedding]
name = "embeddings"
dim = {dim}
normalize = true

[classifier]
name = "probs"
labels = "{NAME}.labels.txt"
"""


def check_with_onnxruntime(model_path: Path, dim: int) -> None:
    """Runs the saved model once when onnxruntime is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: the saved model was not run")
        return
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    emb, probs = session.run(["embeddings", "probs"], {"input": x})
    assert emb.shape == (2, dim) and np.isfinite(emb).all(), emb.shape
    assert probs.shape == (2, NUM_LABELS) and np.allclose(probs.sum(axis=1), 1, atol=1e-4), probs.shape
    print("onnxruntime: the saved model runs (batch 2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "target" / "bench-model",
                        help="directory to write the model, its labels and its manifest into")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="embedding dimension")
    args = parser.parse_args()
    if args.dim < 1:
        print("error: --dim must be positive", file=sys.stderr)
        return 1

    model, macs, params = build_model(args.dim)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / f"{NAME}.onnx"
    onnx.save_model(model, model_path)
    (args.out / f"{NAME}.labels.txt").write_text("".join(f"product-{i:03d}\n" for i in range(NUM_LABELS)))
    manifest_path = args.out / f"{NAME}.toml"
    manifest_path.write_text(manifest(args.dim, macs))

    print(f"model:    {model_path} ({model_path.stat().st_size} bytes, {params} parameters, opset {OPSET})")
    print(f"compute:  {macs / 1e9:.3f} G multiply-adds = {2 * macs / 1e9:.3f} GFLOPs per image")
    print(f"manifest: {manifest_path}")
    check_with_onnxruntime(model_path, args.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
