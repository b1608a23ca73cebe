"""INT8 recipes for ONNX Runtime on CPUs, chosen from what the graph contains, never from the model's name.

    facts = graph_facts(onnx.load("model.fp32.onnx"))
    for recipe in applicable(facts, isa=cpu_isa()):
        print(recipe.name, recipe.why)

A recipe is a named, explicit choice: which op types are quantized, which groups of nodes stay in float
(the stem or the stem block, depthwise convs, squeeze-excite gates, attention), per-channel or per-tensor
weights, `reduce_range`, static (calibrated Q/DQ) or dynamic quantization, and whether ONNX Runtime's
transformer optimizer runs first. `Recipe.to_dict()` is what the manifest records; `quantize.int8_recipe`
applies one.

Why these recipes, from ONNX Runtime's MLAS kernels and QDQ transformer (see shared/DESIGN.md):
- INT8 depthwise convs are slower than FP32's AVX-512 (NCHWc) ones. With int8 weights of zero point 0 and
  channels in multiples of 16, MLAS runs them on its ConvSym kernel (AVX-512 VNNI where the CPU has it); any
  other channel count takes its generic INT8 depthwise kernel, which is AVX2-only. Measured on an AVX-512
  VNNI EPYC (benchmarks/bench_depthwise.py, 3x3 at 56x56): INT8 takes 1.2-1.6x FP32's time at 96 or 112
  channels, 2.1-2.9x at 88 or 104;
- QDQ fusion covers Conv, MatMul, Gemm, Add, Mul, Sigmoid, Softmax, (Global)AveragePool, LeakyRelu,
  Concat, Where, Split; any other op wrapped in Q/DQ (LayerNormalization, an Erf GELU) runs in float between
  a DequantizeLinear and a QuantizeLinear, which is pure overhead;
- VNNI speeds up only U8S8 GEMM and ConvSym; CPUs without it saturate 16-bit sums, which `reduce_range`
  (7-bit weights) avoids.
- Attention's activation x activation MatMuls quantize to U8U8 GEMMs (both inputs uint8 activations) and its
  softmax to QLinearSoftmax; on an AVX2 CPU both cost more than the float ops (`attn-float` keeps them float).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.registry import Registry

# Ops that carry the compute: quantizing only these leaves every elementwise op, norm and softmax in float.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# Ops ONNX Runtime's QDQ quantizer wraps in Q/DQ but no CPU QDQ fusion turns into an integer kernel.
UNFUSED_OPS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization", "Erf", "Gelu", "Div",
               "Pow", "Sqrt", "ReduceMean")
# Between a spatial pooling and the gate, an SE branch holds only these (convs, activations, reshapes).
_SE_BRANCH_OPS = {"Conv", "Gemm", "MatMul", "Relu", "Sigmoid", "HardSigmoid", "Mul", "Add", "Clip", "Div",
                  "HardSwish", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # plus the pooling itself
_SE_MAX_NODES = 12
# ONNX Runtime's x86 ConvSym depthwise kernels (AVX2, AVX-512, VNNI) take channel counts in multiples of this
DEPTHWISE_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """What an FP32 score-model graph contains, as far as INT8 speed on ONNX Runtime goes."""

    ops: dict[str, int]  # op type -> count
    stem: str | None  # the first Conv/MatMul/Gemm: the stem conv or the patch embedding
    depthwise: tuple[str, ...]  # Conv nodes with group == input channels > 1
    se_gates: tuple[str, ...]  # nodes of squeeze-excite branches: pooling -> ... -> Sigmoid -> the gating Mul
    se_blocks: int  # how many such gates
    norms: tuple[str, ...]  # LayerNormalization / InstanceNormalization / BatchNormalization
    gelus: tuple[str, ...]  # Gelu ops and the Erf of a decomposed GELU
    softmaxes: tuple[str, ...]  # attention softmaxes (the head's is kept in float anyway)
    attention_matmuls: tuple[str, ...]  # MatMuls of two activations (Q @ K^T, attn @ V)
    weight_matmuls: tuple[str, ...]  # MatMul/Gemm with a constant B (linear layers)
    convs: int  # Conv nodes, depthwise included
    spatial_means: tuple[str, ...] = ()  # ReduceMean over H, W (keepdims): a GlobalAveragePool in other words
    depthwise_channels: tuple[int, ...] = ()  # channels of each depthwise conv, in the order of `depthwise`
    # the stem and the convs after it at its resolution, through the narrowest one (see stem_block); () when
    # the stem is the narrowest there
    stem_block: tuple[str, ...] = ()

    @property
    def transformer(self) -> bool:
        """Attention blocks: activation x activation MatMuls next to LayerNorms."""
        return bool(self.attention_matmuls) and bool(self.norms)

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Node groups a recipe may keep in float, by name."""
        return {"stem": (self.stem,) if self.stem else (), "depthwise": self.depthwise, "se": self.se_gates,
                "attention": self.attention_matmuls + self.softmaxes, "stem_block": self.stem_block}

    def summary(self) -> dict[str, Any]:
        return {"stem": self.stem, "depthwise_convs": len(self.depthwise), "se_blocks": self.se_blocks,
                "norms": len(self.norms), "gelus": len(self.gelus), "softmaxes": len(self.softmaxes),
                "attention_matmuls": len(self.attention_matmuls), "weight_matmuls": len(self.weight_matmuls),
                "depthwise_not_16_aligned": len(self.depthwise_unaligned), "convs": self.convs,
                "spatial_means": len(self.spatial_means), "stem_block_nodes": len(self.stem_block),
                "ops": dict(sorted(self.ops.items()))}

    @property
    def depthwise_unaligned(self) -> tuple[str, ...]:
        """Depthwise convs whose channel count is not a multiple of 16: ONNX Runtime's x86 symmetric (ConvSym)
        INT8 depthwise kernel needs one, so these run on its generic, AVX2-only INT8 depthwise kernel."""
        return tuple(n for n, c in zip(self.depthwise, self.depthwise_channels) if c % DEPTHWISE_ALIGN)


def graph_constants(graph) -> dict[str, Any]:
    from onnx import numpy_helper

    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return {name: numpy_helper.to_array(t) for name, t in found.items()}


def _attr(node, name: str, default=None):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _is_depthwise(node, constants) -> bool:
    group = _attr(node, "group", 1)
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    # depthwise: one input channel per group (weight [C_out, 1, kh, kw]), more than one group
    return group > 1 and weight is not None and weight.ndim == 4 and weight.shape[1] == 1


def is_spatial_pool(node, constants) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1:  # opset 18+: axes is an input
        value = constants.get(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3] and _attr(node, "keepdims", 1) == 1


def _se_branch(gate, producers, constants) -> list | None:
    """The squeeze-excite branch that `gate` (a Mul) applies, or None: every ancestor of one of its inputs
    back to a spatial pooling of its other input, all of them convs, activations or reshapes."""
    for side in (0, 1):
        features, branch, pool = gate.input[1 - side], [], None
        queue, seen = [gate.input[side]], set()
        while queue:
            name = queue.pop()
            node = producers.get(name)
            if node is None or len(branch) >= _SE_MAX_NODES:  # a graph input, or too far for a gate
                pool = None
                break
            if node.name in seen:
                continue
            seen.add(node.name)
            branch.append(node)
            if is_spatial_pool(node, constants):
                if node.input[0] != features:
                    break
                pool = node  # the branch starts here: do not walk into the features themselves
                continue
            if node.op_type not in _SE_BRANCH_OPS:
                pool = None
                break
            queue.extend(i for i in node.input if i and i not in constants)
        if pool is not None and any(n.op_type in ("Sigmoid", "HardSigmoid") for n in branch):
            return [*branch, gate]
    return None


def _strided(node) -> bool:
    return node.op_type in ("Conv", "MaxPool", "AveragePool") and any(s > 1 for s in _attr(node, "strides", ()))


def stem_block(nodes, constants, se_gates: Iterable[str] = ()) -> tuple[str, ...]:
    """The nodes from the start through the narrowest conv at the stem's output resolution, and what follows
    it up to the next conv (its activation, a residual add): () when the stem itself is the narrowest there.

    At the stem's resolution the feature maps are large and the channels few, so INT8 convs there are bound
    by memory, not arithmetic, and their integer SiLUs cost more than float ones; the narrowest feature map
    is where a float block's hand-over to the integer pipeline (one QuantizeLinear) costs least. Measured on a
    2-core AVX2 EPYC: EfficientNet-B0's stem and first block in float, the rest as qdq-all, 1.20x FP32 at 2
    threads (timed with spinning off; 1.16x spinning within runs) and 1.28x at 1 (qdq-all 1.15x and
    1.22-1.24x); the same cut one block later or at the stride was slower than qdq-all. A squeeze-excite branch's convs (1x1 maps) do not count as feature maps."""
    se_gates = set(se_gates)
    compute = [i for i, n in enumerate(nodes) if n.op_type in COMPUTE_OPS and n.name not in se_gates]
    if not compute or nodes[compute[0]].op_type != "Conv":
        return ()

    def width(node) -> int | None:
        weight = constants.get(node.input[1]) if len(node.input) > 1 else None
        return int(weight.shape[0]) if weight is not None and weight.ndim == 4 else None

    start = compute[0]
    narrowest, narrow = start, width(nodes[start])
    for i in range(start + 1, len(nodes)):
        node = nodes[i]
        if node.name in se_gates:
            continue
        if _strided(node) or node.op_type in ("MatMul", "Gemm"):
            break  # the resolution drops, or a linear layer: past the stem's block
        if node.op_type == "Conv":
            channels = width(node)
            if narrow is None or channels is None:
                return ()
            if channels < narrow:
                narrowest, narrow = i, channels
    if narrowest == start:
        return ()
    end = next((i for i in compute if i > narrowest), len(nodes))
    return tuple(n.name for n in nodes[:end])


def graph_facts(model, ignore: Iterable[str] = ()) -> GraphFacts:
    """Facts of an ONNX ModelProto (FP32, topologically sorted, as `export_fp32` writes it); the nodes named
    in `ignore` (the head and input normalization, which stay float anyway) are not counted."""
    graph = model.graph
    constants = graph_constants(graph)
    producers = {output: node for node in graph.node for output in node.output}
    ignore = set(ignore)
    nodes = [n for n in graph.node if n.name not in ignore]
    ops: dict[str, int] = {}
    for node in nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    compute = [n for n in nodes if n.op_type in COMPUTE_OPS]
    depthwise = [n for n in nodes if n.op_type == "Conv" and _is_depthwise(n, constants)]
    se: list[str] = []
    blocks = 0
    for node in nodes:
        if node.op_type == "Mul" and node.name not in se:
            branch = _se_branch(node, producers, constants)
            if branch:
                blocks += 1
                se.extend(n.name for n in branch if n.name not in se)
    matmuls = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    attention = [n.name for n in matmuls if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    return GraphFacts(
        ops=ops, stem=compute[0].name if compute else None, depthwise=tuple(n.name for n in depthwise),
        depthwise_channels=tuple(int(constants[n.input[1]].shape[0]) for n in depthwise), se_gates=tuple(se),
        se_blocks=blocks,
        norms=tuple(n.name for n in nodes if n.op_type in ("LayerNormalization", "InstanceNormalization",
                                                            "BatchNormalization")),
        gelus=tuple(n.name for n in nodes if n.op_type in ("Gelu", "Erf")),
        softmaxes=tuple(n.name for n in nodes if n.op_type == "Softmax"),
        attention_matmuls=tuple(attention),
        weight_matmuls=tuple(n.name for n in matmuls if n.name not in attention),
        convs=ops.get("Conv", 0),
        spatial_means=tuple(n.name for n in nodes if n.op_type == "ReduceMean" and is_spatial_pool(n, constants)),
        stem_block=stem_block(nodes, constants, se))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One named INT8 recipe for ONNX Runtime; every field is a knob of onnxruntime.quantization."""

    name: str  # e.g. "qdq-all", "dw-float+stem-int8"
    why: str  # what in the graph (and CPU) made this recipe a candidate, one line
    mode: str = "static"  # static: calibrated Q/DQ (quantize_static) | dynamic: quantize_dynamic
    op_types: tuple[str, ...] = ()  # op types to quantize; empty: every type ONNX Runtime's quantizer knows
    # node groups kept in float besides the head: stem, stem_block, depthwise, se, attention (its MatMuls and
    # softmaxes)
    float_groups: tuple[str, ...] = ()
    per_channel: bool = True  # per-output-channel weight scales (False: one scale per tensor)
    reduce_range: bool = False  # 7-bit weights: avoids 16-bit saturation on x86 CPUs without VNNI
    activation_symmetric: bool = False  # symmetric activation ranges (uint8 zero point 128)
    matmul_const_b_only: bool = False  # quantize only MatMuls with a constant B (activation x activation stays float)
    keep_removable_activations: bool = False  # keep Relu/Clip after a quantized node (QDQKeepRemovableActivations)
    optimizer: str | None = None  # onnxruntime transformer optimizer model type run first (vit, swin), or None
    means_as_pools: bool = False  # rewrite ReduceMean over H, W as GlobalAveragePool first (same values)

    @property
    def stem(self) -> str:
        """int8, float (the stem conv) or block (the stem block: GraphFacts.stem_block) in float."""
        return "block" if "stem_block" in self.float_groups else "float" if "stem" in self.float_groups else "int8"

    @property
    def integer_pipeline(self) -> bool:
        """Static Q/DQ of every op type with nothing in float but the stem and attention: one integer pipeline,
        which a float stem block hands over to once (recipes that leave convs or gates float hand over at
        each of them already)."""
        return self.mode == "static" and not self.op_types and set(self.float_groups) <= {"stem", "attention"}

    def with_stem(self, stem: str) -> Recipe:
        """The same recipe with the stem in int8, in float, or the stem block in float (the name says which)."""
        if stem not in STEMS:
            raise ConfigError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        groups = tuple(g for g in self.float_groups if g not in ("stem", "stem_block"))
        groups += {"int8": (), "float": ("stem",), "block": ("stem", "stem_block")}[stem]
        base = self.name.split("+stem-")[0]
        return dataclasses.replace(self, name=f"{base}+stem-{stem}", float_groups=groups)

    def nodes_to_exclude(self, facts: GraphFacts) -> list[str]:
        """The graph's nodes this recipe keeps in float (the head is added by the caller)."""
        groups = facts.groups()
        names: list[str] = []
        for group in self.float_groups:
            names.extend(n for n in groups.get(group, ()) if n not in names)
        return names

    def to_dict(self) -> dict[str, Any]:
        """As the manifest records it (JSON types: lists, not tuples)."""
        saved = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {**saved, "stem": self.stem}


# --- the catalogue -------------------------------------------------------------------------------------
# Each entry: (facts, isa) -> a Recipe when the graph has what the recipe is for, else None.

RECIPES: Registry[Callable[[GraphFacts, Isa], Recipe | None]] = Registry("INT8 recipe")


@dataclasses.dataclass(frozen=True)
class Isa:
    """The CPU features the recipes depend on (from kdiqa_edge.bench.environment.cpu_isa)."""

    flags: tuple[str, ...] = ()

    @property
    def x86(self) -> bool:
        return "avx2" in self.flags or any(f.startswith("avx") for f in self.flags)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni"))

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def reduce_range(self) -> bool:
        """ONNX Runtime's advice: 7-bit weights on x86 CPUs without VNNI (their U8S8 sums saturate)."""
        return self.x86 and not self.vnni

    def describe(self) -> str:
        if not self.x86:
            return "non-x86 CPU"
        return "AVX-512 VNNI" if self.avx512 and self.vnni else "AVX-VNNI" if self.vnni else \
            "AVX-512 without VNNI" if self.avx512 else "AVX2 without VNNI"

    @classmethod
    def here(cls) -> Isa:
        from kdiqa_edge.bench.environment import cpu_isa

        return cls(tuple(cpu_isa()))


def register_recipe(name: str):
    return RECIPES.register(name)


@register_recipe("qdq-all")
def _qdq_all(facts: GraphFacts, isa: Isa) -> Recipe:
    return Recipe("qdq-all", "every op ONNX Runtime's QDQ quantizer knows (the plain quantize_static form)",
                  reduce_range=isa.reduce_range)


@register_recipe("attn-float")
def _attention_float(facts: GraphFacts, isa: Isa) -> Recipe | None:
    if not facts.attention_matmuls:
        return None
    # Measured on a 2-core AVX2 EPYC (benchmarks/results/int8-amd-epyc-2c-avx2-without-vnni.md), qdq-all ->
    # attn-float: mobilevit_s 1.19x -> 1.31x FP32, swin_tiny 1.31x -> 1.36x, ViT-B/32 1.77x -> 1.81x; a float
    # Softmax alone gains nothing (its DQ/Q cost what QLinearSoftmax does).
    why = (f"{len(facts.attention_matmuls)} activation x activation MatMuls and {len(facts.softmaxes)} "
           "softmaxes between them left out of Q/DQ (every other op as qdq-all): quantized, both MatMul inputs "
           "are uint8 activations (U8U8, off the U8S8 kernels' fast path) and QLinearSoftmax costs more than a "
           "float Softmax; ONNX Runtime runs them as float MatMuls, or as MatMulIntegerToFloat where both inputs "
           "arrive dequantized (no re-quantized scores)")
    return Recipe("attn-float", why, float_groups=("attention",), reduce_range=isa.reduce_range)


@register_recipe("dw-float")
def _depthwise_float(facts: GraphFacts, isa: Isa) -> Recipe | None:
    if not facts.depthwise:
        return None
    kernel = ("INT8 depthwise is slower than FP32's AVX-512 depthwise kernel here" if isa.avx512 else
              "INT8 depthwise convs gain little over FP32 ones")
    unaligned = len(facts.depthwise_unaligned)
    if isa.x86 and unaligned:
        kernel += (f"; {unaligned} of them have channels not a multiple of {DEPTHWISE_ALIGN} and run on ONNX "
                   "Runtime's AVX2-only INT8 depthwise kernel")
    se = f" and {facts.se_blocks} squeeze-excite gates ({len(facts.se_gates)} nodes)" if facts.se_gates else ""
    return Recipe("dw-float", f"{len(facts.depthwise)} depthwise convs{se} kept in float: {kernel}",
                  float_groups=("depthwise", "se") if facts.se_gates else ("depthwise",),
                  reduce_range=isa.reduce_range)


@register_recipe("compute-only")
def _compute_only(facts: GraphFacts, isa: Isa) -> Recipe | None:
    unfused = sum(facts.ops.get(op, 0) for op in UNFUSED_OPS)
    # SiLU / sigmoid gates after most convs: each becomes a QLinearSigmoid + QLinearMul pair in qdq-all
    gated = facts.convs > 1 and facts.ops.get("Sigmoid", 0) >= facts.convs / 2
    if not (unfused or facts.attention_matmuls or gated):
        return None
    parts = [f"{unfused} ops with no QDQ fusion (LayerNorm, GELU, ReduceMean...)" if unfused else "",
             f"{len(facts.attention_matmuls)} activation x activation MatMuls" if facts.attention_matmuls else "",
             f"{facts.ops['Sigmoid']} Sigmoid gates/SiLUs" if gated else ""]
    return Recipe("compute-only", "only Conv/MatMul/Gemm quantized, with constant B; float: "
                  + ", ".join(p for p in parts if p), op_types=COMPUTE_OPS, matmul_const_b_only=True,
                  reduce_range=isa.reduce_range)


@register_recipe("compute-only-dw-float")
def _compute_only_dw_float(facts: GraphFacts, isa: Isa) -> Recipe | None:
    base = _compute_only(facts, isa)
    if base is None or not facts.depthwise:
        return None
    return dataclasses.replace(base, name="compute-only-dw-float",
                               why=f"{base.why}; {len(facts.depthwise)} depthwise convs float too",
                               float_groups=("depthwise", "se") if facts.se_gates else ("depthwise",))


@register_recipe("dynamic-matmul")
def _dynamic_matmul(facts: GraphFacts, isa: Isa) -> Recipe | None:
    if not facts.transformer:
        return None
    return Recipe("dynamic-matmul", f"{len(facts.weight_matmuls)} linear layers in transformer blocks: the "
                  "transformer optimizer fuses LayerNorm/GELU/attention, then int8 weights with activations "
                  "quantized at run time (quantize_dynamic); convs and attention stay float",
                  mode="dynamic", op_types=("MatMul", "Gemm"), matmul_const_b_only=True,
                  reduce_range=isa.reduce_range, optimizer="vit")


STEMS = ("int8", "float", "block")


def _build(name: str, facts: GraphFacts, isa: Isa) -> Recipe | None:
    """A catalogue entry for this graph, with the knobs every static recipe shares."""
    recipe = RECIPES.get(name)(facts, isa)
    if recipe is not None and recipe.mode == "static" and facts.spatial_means:
        # A spatial ReduceMean (timm's squeeze-excite) has no QDQ fusion: it runs in float between a DQ and
        # a Q, on the channels-last tensors the integer convs leave (16 % of EfficientNet-B0's INT8 time,
        # measured). As a GlobalAveragePool it runs as QLinearGlobalAveragePool, in the integer pipeline.
        recipe = dataclasses.replace(recipe, means_as_pools=True)
    return recipe


def applicable(facts: GraphFacts, isa: Isa | None = None, stems: Iterable[str] = STEMS) -> list[Recipe]:
    """Every recipe the graph calls for; static recipes once per stem choice (dynamic ones leave convs float),
    the stem block in float only where the graph has one and the recipe is one integer pipeline."""
    isa = isa or Isa.here()
    found = []
    for name in RECIPES:
        recipe = _build(name, facts, isa)
        if recipe is None:
            continue
        if recipe.mode == "dynamic" or not facts.stem:
            found.append(recipe)
            continue
        for stem in stems:
            if stem != "block" or (facts.stem_block and recipe.integer_pipeline):
                found.append(recipe.with_stem(stem))
    return found


def named(name: str, facts: GraphFacts, isa: Isa | None = None, stem: str | None = None) -> Recipe:
    """One recipe by name (`qdq-all`, `dw-float+stem-int8`, ...) with `stem` if given (else the name's),
    refused when the graph does not call for it."""
    base, _, named_stem = name.partition("+stem-")
    RECIPES.get(base)  # an unknown name: the registry's one-line error
    recipe = _build(base, facts, isa or Isa.here())
    if recipe is None:
        raise ConfigError(f"INT8 recipe {base!r} does not apply to this graph (it has none of what it is for)")
    stem = stem or named_stem
    if stem == "block" and not facts.stem_block:
        raise ConfigError("stem block: no conv after this graph's stem is narrower at the stem's resolution, so "
                          "the block would be the stem alone: --int8-stem float keeps just the stem in float")
    return recipe.with_stem(stem) if stem else recipe
