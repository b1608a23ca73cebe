"""INT8 recipes are chosen from the graph: depthwise convs, squeeze-excite gates, attention MatMuls, LayerNorm.

Small hand-built graphs check the detection; tiny timm exports check that a recipe does what its name says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.export import recipes
from kdiqa_edge.export.recipes import Isa, graph_facts

AVX2 = Isa(("avx2",))
VNNI = Isa(("avx2", "avx512f", "avx512_vnni"))
ARM = Isa(("asimd", "asimddp"))


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32), name)


def _model(nodes, inits, shape=(1, 8, 8, 8), out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_net():
    """stem conv -> depthwise 3x3 (group 8) -> grouped 3x3 (group 2, not depthwise) -> SE gate -> SiLU."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wdw"], ["b"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "wg"], ["c"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        # squeeze-excite: pool over H, W -> reduce conv -> relu -> expand conv -> sigmoid -> gate the features
        helper.make_node("ReduceMean", ["c"], ["s0"], name="se/pool", axes=[2, 3], keepdims=1),
        helper.make_node("Conv", ["s0", "wr"], ["s1"], name="se/reduce"),
        helper.make_node("Relu", ["s1"], ["s2"], name="se/relu"),
        helper.make_node("Conv", ["s2", "we"], ["s3"], name="se/expand"),
        helper.make_node("Sigmoid", ["s3"], ["s4"], name="se/sigmoid"),
        helper.make_node("Mul", ["c", "s4"], ["d"], name="se/gate"),
        # SiLU = x * sigmoid(x): a Sigmoid gating its own input is not squeeze-excite
        helper.make_node("Sigmoid", ["d"], ["e"], name="silu/sigmoid"),
        helper.make_node("Mul", ["d", "e"], ["y"], name="silu/mul"),
    ]
    inits = [_weight("w0", 8, 8, 3, 3), _weight("wdw", 8, 1, 3, 3), _weight("wg", 8, 4, 3, 3),
             _weight("wr", 2, 8, 1, 1), _weight("we", 8, 2, 1, 1)]
    return _model(nodes, inits)


def _attention_block():
    """LayerNorm -> q, k, v projections -> q @ k^T -> softmax -> @ v -> output projection."""
    d = 16
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "bb"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="attn/q"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="attn/k"),
        helper.make_node("MatMul", ["n", "wv"], ["v"], name="attn/v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="attn/kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="attn/qk"),
        helper.make_node("Softmax", ["s"], ["p"], name="attn/softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="attn/pv"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="attn/proj"),
    ]
    inits = [_weight("g", d), _weight("bb", d), *(_weight(f"w{n}", d, d) for n in "qkvo")]
    return _model(nodes, inits, shape=(1, 4, d))


def test_depthwise_and_squeeze_excite_are_found():
    facts = graph_facts(_conv_net())
    assert facts.stem == "stem"
    assert facts.depthwise == ("dw",)  # the group-2 conv has 4 input channels per group: not depthwise
    assert facts.se_blocks == 1
    assert set(facts.se_gates) == {"se/pool", "se/reduce", "se/relu", "se/expand", "se/sigmoid", "se/gate"}
    assert not facts.attention_matmuls and not facts.norms and not facts.transformer


def test_global_average_pool_gate_is_squeeze_excite_too():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
             helper.make_node("Conv", ["p", "w"], ["c"], name="fc"),
             helper.make_node("HardSigmoid", ["c"], ["h"], name="hsig"),
             helper.make_node("Mul", ["x", "h"], ["y"], name="gate")]
    assert graph_facts(_model(nodes, [_weight("w", 8, 8, 1, 1)])).se_blocks == 1
    # the same branch gating some other tensor is no squeeze-excite
    nodes[-1] = helper.make_node("Mul", ["p", "h"], ["y"], name="gate")
    assert graph_facts(_model(nodes, [_weight("w", 8, 8, 1, 1)])).se_blocks == 0


def test_attention_matmuls_and_layernorm_are_found():
    facts = graph_facts(_attention_block())
    assert set(facts.attention_matmuls) == {"attn/qk", "attn/pv"}  # activation x activation
    assert set(facts.weight_matmuls) == {"attn/q", "attn/k", "attn/v", "attn/proj"}
    assert facts.norms == ("norm",) and facts.softmaxes == ("attn/softmax",) and facts.transformer
    assert facts.stem == "attn/q" and facts.depthwise == ()


def _stem_block_net():
    """stem (16) -> SiLU -> depthwise (16) -> SE (4) -> pointwise 16 -> 8 -> conv 8 -> 32 -> strided 32 -> 4."""
    def silu(x, y, name):
        return [helper.make_node("Sigmoid", [x], [f"{y}s"], name=f"{name}/sigmoid"),
                helper.make_node("Mul", [x, f"{y}s"], [y], name=f"{name}/mul")]

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]), *silu("a", "a1", "stem/act"),
        helper.make_node("Conv", ["a1", "wdw"], ["b"], name="b0/dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["b"], ["s0"], name="b0/se/pool", axes=[2, 3], keepdims=1),
        helper.make_node("Conv", ["s0", "wr"], ["s1"], name="b0/se/reduce"),  # 4 channels, but a 1x1 map
        helper.make_node("Relu", ["s1"], ["s2"], name="b0/se/relu"),
        helper.make_node("Conv", ["s2", "we"], ["s3"], name="b0/se/expand"),
        helper.make_node("Sigmoid", ["s3"], ["s4"], name="b0/se/sigmoid"),
        helper.make_node("Mul", ["b", "s4"], ["c"], name="b0/se/gate"),
        helper.make_node("Conv", ["c", "wpw"], ["d"], name="b0/pw"),  # the narrowest at the stem's resolution
        helper.make_node("Conv", ["d", "w1"], ["e"], name="b1/pw"), *silu("e", "e1", "b1/act"),
        helper.make_node("Conv", ["e1", "w2"], ["f"], name="b1/dw", group=32, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["f", "w3"], ["y"], name="b1/pwl"),  # narrower still, but past the stride
    ]
    inits = [_weight("w0", 16, 3, 3, 3), _weight("wdw", 16, 1, 3, 3), _weight("wr", 4, 16, 1, 1),
             _weight("we", 16, 4, 1, 1), _weight("wpw", 8, 16, 1, 1), _weight("w1", 32, 8, 1, 1),
             _weight("w2", 32, 1, 3, 3), _weight("w3", 4, 32, 1, 1)]
    return _model(nodes, inits, shape=(1, 3, 16, 16))


def test_stem_block_runs_through_the_narrowest_conv_at_the_stems_resolution():
    facts = graph_facts(_stem_block_net())
    names = [n.name for n in _stem_block_net().graph.node]
    assert facts.stem_block == tuple(names[:names.index("b1/pw")])  # through b0/pw, the SE branch inside it
    assert facts.summary()["stem_block_nodes"] == len(facts.stem_block)
    # the stem the narrowest there (the test CNNs above, a ResNet's stem before its max-pool): no block
    assert graph_facts(_conv_net()).stem_block == () and graph_facts(_attention_block()).stem_block == ()
    pooled = _model([helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
                     helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                     helper.make_node("Conv", ["p", "w1"], ["y"], name="narrow")],
                    [_weight("w0", 16, 3, 3, 3), _weight("w1", 4, 16, 1, 1)], shape=(1, 3, 16, 16))
    assert graph_facts(pooled).stem_block == ()  # narrower, but after the resolution drops


def test_the_stem_block_is_a_third_stem_choice():
    facts = graph_facts(_stem_block_net())
    found = _names(facts, AVX2)
    # the whole-graph integer pipeline gets it; recipes that leave convs or gates float hand over there anyway
    assert {"qdq-all+stem-int8", "qdq-all+stem-float", "qdq-all+stem-block"} <= found
    assert not any(n.endswith("+stem-block") for n in found - {"qdq-all+stem-block"})
    block = recipes.named("qdq-all", facts, AVX2, stem="block")
    assert block.name == "qdq-all+stem-block" and block.stem == "block"
    assert set(block.nodes_to_exclude(facts)) == set(facts.stem_block)
    assert block.to_dict()["float_groups"] == ["stem", "stem_block"] and block.to_dict()["stem"] == "block"
    assert block.with_stem("float").nodes_to_exclude(facts) == ["stem"]  # back to the stem alone
    # asked for by name, on any static recipe; refused in one line where the graph has no stem block
    assert recipes.named("dw-float+stem-block", facts, AVX2).stem == "block"
    with pytest.raises(ConfigError, match="stem block"):
        recipes.named("qdq-all", graph_facts(_conv_net()), AVX2, stem="block")
    with pytest.raises(ConfigError, match="unknown stem"):
        block.with_stem("half")


def test_ignored_nodes_are_not_counted():
    facts = graph_facts(_attention_block(), ignore=["norm", "attn/softmax"])
    assert facts.norms == () and facts.softmaxes == () and "LayerNormalization" not in facts.ops


def _names(facts, isa=VNNI) -> set[str]:
    return {r.name for r in recipes.applicable(facts, isa)}


def test_recipes_follow_the_graph_not_the_name():
    plain = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="stem", pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["c"], ["r"], name="relu"),
                    helper.make_node("Conv", ["r", "w"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
                   [_weight("w", 8, 8, 3, 3)])
    # a plain CNN: only the every-op recipe, with the stem in int8 and in float
    assert _names(graph_facts(plain)) == {"qdq-all+stem-int8", "qdq-all+stem-float"}
    # depthwise + SE + SiLU: depthwise kept float, compute-only, and both
    conv = _names(graph_facts(_conv_net()))
    assert {"dw-float+stem-int8", "compute-only+stem-float", "compute-only-dw-float+stem-int8"} <= conv
    assert "dynamic-matmul" not in conv
    # attention: compute-only (LayerNorm/Softmax and q @ k^T float) and the dynamic transformer recipe
    attention = _names(graph_facts(_attention_block()))
    assert {"dynamic-matmul", "compute-only+stem-int8", "qdq-all+stem-float", "attn-float+stem-int8"} <= attention
    assert not any(name.startswith("dw-float") for name in attention)
    assert not any(name.startswith("attn-float") for name in conv)  # no activation x activation MatMul there


def test_recipe_knobs_are_explicit():
    facts = graph_facts(_conv_net())
    dw = recipes.named("dw-float", facts, VNNI).with_stem("float")
    assert dw.name == "dw-float+stem-float" and dw.stem == "float" and dw.mode == "static"
    assert set(dw.nodes_to_exclude(facts)) == {"stem", "dw", *facts.se_gates}
    assert "AVX-512" in dw.why and "1 squeeze-excite" in dw.why
    # its 8 channels are no multiple of 16: ONNX Runtime's generic (AVX2-only) INT8 depthwise kernel runs it
    assert facts.depthwise_channels == (8,) and facts.depthwise_unaligned == ("dw",)
    assert "1 of them have channels not a multiple of 16" in dw.why
    assert facts.summary()["depthwise_not_16_aligned"] == 1
    aligned = graph_facts(_model([helper.make_node("Conv", ["x", "w"], ["y"], name="dw16", group=16)],
                                 [_weight("w", 16, 1, 3, 3)], shape=(1, 16, 8, 8)))
    assert aligned.depthwise == ("dw16",) and aligned.depthwise_unaligned == ()
    assert "not a multiple" not in recipes.named("dw-float", aligned, VNNI).why
    saved = dw.to_dict()  # what the manifest records
    assert saved["float_groups"] == ["depthwise", "se", "stem"] and saved["per_channel"] is True
    compute = recipes.named("compute-only", graph_facts(_attention_block()), VNNI)
    assert compute.op_types == ("Conv", "MatMul", "Gemm") and compute.matmul_const_b_only
    attention = recipes.named("attn-float", graph_facts(_attention_block()), AVX2)
    # q @ k^T, the softmax and p @ v stay float; the projections (constant B) are quantized as in qdq-all
    assert set(attention.nodes_to_exclude(graph_facts(_attention_block()))) == {"attn/qk", "attn/softmax", "attn/pv"}
    assert attention.op_types == () and attention.reduce_range and "2 activation x activation" in attention.why
    dynamic = recipes.named("dynamic-matmul", graph_facts(_attention_block()), VNNI)
    assert dynamic.mode == "dynamic" and dynamic.optimizer == "vit"
    with pytest.raises(ConfigError, match="does not apply"):
        recipes.named("dynamic-matmul", facts, VNNI)
    with pytest.raises(ConfigError, match="unknown INT8 recipe"):
        recipes.named("int4-magic", facts, VNNI)


def test_reduce_range_only_on_x86_without_vnni():
    facts = graph_facts(_conv_net())
    assert AVX2.reduce_range and not VNNI.reduce_range and not ARM.reduce_range
    assert all(r.reduce_range for r in recipes.applicable(facts, AVX2))
    assert not any(r.reduce_range for r in recipes.applicable(facts, VNNI))
    assert "AVX-512" not in recipes.named("dw-float", facts, AVX2).why


def test_cpu_isa_from_cpuinfo(monkeypatch):
    from kdiqa_edge.bench import environment

    cpuinfo = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\n"
               "flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_tile\n")
    monkeypatch.setattr(environment, "_read", lambda path: cpuinfo if path == "/proc/cpuinfo" else None)
    assert environment.cpu_isa() == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    info = environment.cpu_info()
    assert info["model"] == "AMD EPYC 9R14" and "avx512_vnni" in environment.cpu_line(info)
    # the bench records it with every figure: JSON (environment) and markdown (the CPU line)
    from kdiqa_edge.bench import BenchConfig
    from kdiqa_edge.bench.report import environment_lines
    from kdiqa_edge.bench.runner import BenchReport

    env = environment.environment(threads=2)
    assert env["cpu_isa"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    line = environment_lines(BenchReport(environment=env, config=BenchConfig(), dataset=None, results=[]))[0]
    assert "AMD EPYC 9R14" in line and "ISA avx2 avx512f avx512_vnni" in line
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nHardware\t: Jetson\n"
    monkeypatch.setattr(environment, "_read", lambda path: arm if path == "/proc/cpuinfo" else None)
    assert environment.cpu_isa() == ["asimd", "asimddp", "i8mm"]


# --- recipes applied to tiny timm score models ----------------------------------------------------------


torch = pytest.importorskip("torch")
pytest.importorskip("timm")


def _fp32(arch: str, folder: Path) -> Path:
    from kdiqa_edge.export.base import ExportConfig
    from kdiqa_edge.export.onnx import export_fp32, score_model
    from kdiqa_edge.models import QualityHead
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.preprocess import PreprocessSpec

    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), 14.3)
    student = create_student(arch, head, PreprocessSpec(size=64), pretrained=False).eval()
    return export_fp32(score_model(student, ExportConfig()), folder / f"{arch}.onnx", 17)


def _dequantized_inputs(path: Path) -> dict[str, list[bool]]:
    """node name -> for each input, whether a DequantizeLinear produces it (the node runs quantized)."""
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: [i in dequantized for i in n.input] for n in graph.node}


def test_recipes_quantize_what_they_say(tmp_path):
    from kdiqa_edge.export.evaluate import kernel_profile
    from kdiqa_edge.export.onnx import Int8Graph

    fp32 = _fp32("test_efficientnet", tmp_path)
    calib = np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32)
    graph = Int8Graph(fp32, calib, "minmax", tmp_path)
    assert graph.facts.depthwise and graph.facts.se_blocks  # an EfficientNet has both, found from its graph
    built = {}
    for name in ("qdq-all+stem-int8", "dw-float+stem-float", "compute-only+stem-int8", "qdq-all+stem-block"):
        built[name] = _dequantized_inputs(graph.build(recipes.named(name, graph.facts, VNNI), tmp_path / f"{name}.onnx"))
    dw, stem = graph.facts.depthwise[0], graph.facts.stem
    # a conv runs in INT8 when its weight (input 1) comes dequantized; a float one reads the float weight
    assert built["qdq-all+stem-int8"][dw][1] and built["qdq-all+stem-int8"][stem][1]
    assert not built["dw-float+stem-float"][dw][1] and not built["dw-float+stem-float"][stem][1]
    assert not built["dw-float+stem-float"][stem][0]  # the pixels are not re-rounded on the way in
    # the stem block: its convs read float weights, every conv after it runs in INT8
    block = set(graph.facts.stem_block)
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    assert block and all(not built["qdq-all+stem-block"][c][1] for c in convs if c in block)
    assert all(built["qdq-all+stem-block"][c][1] for c in convs if c not in block)
    # what ran, from ONNX Runtime's profiler: the SiLU/gate Sigmoid and Mul run as integer kernels in
    # qdq-all only; depthwise and SE convs run as float convs in dw-float
    x = calib[:1]
    ran = {name: {r["op"]: r["count"] for r in kernel_profile(tmp_path / f"{name}.onnx", x, runs=1)["ops"]}
           for name in built}
    assert ran["qdq-all+stem-int8"].get("QLinearSigmoid") and ran["qdq-all+stem-int8"].get("QLinearMul")
    # timm's squeeze-excite mean over H, W ran as an integer global pool, not as a float ReduceMean
    assert graph.facts.spatial_means and recipes.named("qdq-all", graph.facts, VNNI).means_as_pools
    assert ran["qdq-all+stem-int8"]["QLinearGlobalAveragePool"] >= len(graph.facts.spatial_means)
    assert "ReduceMean" not in ran["qdq-all+stem-int8"]
    assert not ran["compute-only+stem-int8"].get("QLinearSigmoid") and ran["compute-only+stem-int8"]["QLinearConv"]
    assert not ran["compute-only+stem-int8"].get("QLinearMul")
    float_convs = {name: sum(n for op, n in ops.items() if op in ("Conv", "FusedConv")) for name, ops in ran.items()}
    se_convs = sum(n.endswith("Conv") for n in graph.facts.se_gates)
    assert float_convs["dw-float+stem-float"] >= len(graph.facts.depthwise) + se_convs + 1
    assert float_convs["qdq-all+stem-int8"] == 0
    # the calibration ran once per set of quantized op types: two caches for four recipes
    assert len(list(tmp_path.glob("calibration-*.json"))) == 2
    for name, nodes in built.items():  # the head stays float in every recipe
        assert not any(any(v) for n, v in nodes.items() if n.startswith("/head/")), name


def test_transformer_recipes_attention_float_and_dynamic(tmp_path):
    from kdiqa_edge.export.evaluate import kernel_profile
    from kdiqa_edge.export.onnx import Int8Graph

    fp32 = _fp32("test_vit", tmp_path)
    graph = Int8Graph(fp32, np.zeros((0, 3, 64, 64), np.float32), "minmax", tmp_path)
    assert graph.facts.transformer and len(graph.facts.attention_matmuls) >= 2
    calib = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    attention = Int8Graph(fp32, calib, "minmax", tmp_path).build(recipes.named("attn-float", graph.facts, VNNI),
                                                                tmp_path / "attn.onnx")
    qdq_all = Int8Graph(fp32, calib, "minmax", tmp_path).build(recipes.named("qdq-all", graph.facts, VNNI),
                                                              tmp_path / "qdq.onnx")
    ran = {name: {r["op"]: r["count"] for r in kernel_profile(path, calib[:1], runs=1)["ops"]}
           for name, path in (("attn", attention), ("all", qdq_all))}
    # what ran, from ONNX Runtime's profiler: in attn-float, attention's softmaxes as float kernels and its
    # MatMuls with float outputs (MatMul, or MatMulIntegerToFloat where both inputs come dequantized), the
    # linear layers as integer kernels in both
    attention_matmuls, softmaxes = len(graph.facts.attention_matmuls), len(graph.facts.softmaxes)
    assert ran["all"].get("QLinearSoftmax", 0) >= softmaxes and not ran["attn"].get("QLinearSoftmax")
    assert ran["attn"].get("Softmax", 0) >= softmaxes
    assert ran["all"]["QLinearMatMul"] - ran["attn"]["QLinearMatMul"] == attention_matmuls
    float_out = {name: ops.get("MatMul", 0) + ops.get("MatMulIntegerToFloat", 0) for name, ops in ran.items()}
    assert float_out["attn"] - float_out["all"] == attention_matmuls
    assert ran["attn"]["QLinearMatMul"] >= len(graph.facts.weight_matmuls) // 2
    path = graph.build(recipes.named("dynamic-matmul", graph.facts, VNNI), tmp_path / "dynamic.onnx")
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
    assert "QuantizeLinear" not in ops  # nothing static: no calibration was needed
    head = [n for n in model.graph.node if n.name.startswith("/head/")]
    assert head and not any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in head)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = sess.run(["score"], {"image": np.zeros((2, 3, 64, 64), np.float32)})[0]
    assert scores.shape == (2,) and np.all((scores >= 1) & (scores <= 5))
