"""Repairs of an ONNX GraphProto after onnxruntime's FP16 converter (`onnx.to_fp16` applies them): casts
around the nodes kept in float, twin nodes, the node order. Plain graph surgery on onnx protos."""

from __future__ import annotations

from kdiqa_edge.errors import ExportError


def drop_round_trips(graph, kept: set[str]) -> None:
    """Let nodes kept in float read each other's FP32 outputs. onnxruntime's FP16 converter casts every output of
    a node in `node_block_list` to FP16, and back to FP32 for the next one kept in float: the head ran in FP32,
    but each of its tensors was rounded to FP16 between its ops (the logits by up to 0.03 at logit_scale 100),
    and so was the score output (steps of 0.002-0.004 between 1 and 5: ties a ranking metric counts). The cast
    back now reads the FP32 tensor itself (an Identity where it is a graph output, which keeps its name); the
    casts to FP16 nobody reads any more go."""
    from onnx import TensorProto, helper

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = {name: node for node in graph.node for name in node.output}
    fp32 = {name for node in graph.node if node.name in kept for name in node.output}
    fp32 |= {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    bypass = {}  # the output of a cast back to FP32 -> the FP32 tensor it came from
    for node in graph.node:
        first = producers.get(node.input[0]) if node.input else None
        if (cast_to(node) == TensorProto.FLOAT and first is not None and cast_to(first) == TensorProto.FLOAT16
                and first.input[0] in fp32):
            bypass[node.output[0]] = first.input[0]
    if not bypass:
        return
    outputs = {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in bypass:
            if node.output[0] in outputs:
                nodes.append(helper.make_node("Identity", [bypass[node.output[0]]], [node.output[0]], name=node.name))
            continue
        for index, name in enumerate(node.input):
            if name in bypass:
                node.input[index] = bypass[name]
        nodes.append(node)
    read = {name for node in nodes for name in node.input} | outputs
    nodes = [n for n in nodes if not (n.op_type == "Cast" and not any(name in read for name in n.output))]
    produced = {name for node in nodes for name in node.output}
    infos = [info for info in graph.value_info if info.name in produced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def drop_twin_nodes(graph) -> None:
    """Keep one of identical nodes that write the same output. onnxruntime's FP16 converter before 1.32 (the
    onnxruntime-gpu on PyPI is 1.31) adds a Cast back to float per float consumer of an FP16 tensor, all with
    one output name, when that tensor feeds two of them (the head's projection output does): the graph is
    then not in SSA form and fails onnx's checker."""
    produced: dict[str, bytes] = {}
    kept = []
    for node in graph.node:
        blob = node.SerializeToString()
        if node.output and all(produced.get(name) == blob for name in node.output):
            continue
        kept.append(node)
        produced.update({name: blob for name in node.output})
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        infos = {}  # the converter's value_info for each twin: one per name
        for info in graph.value_info:
            if info.name not in infos:
                infos[info.name] = type(info)()
                infos[info.name].CopyFrom(info)
        del graph.value_info[:]
        graph.value_info.extend(infos.values())


def toposort(graph) -> None:
    """Reorder a GraphProto's nodes so that every input is produced before it is used (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ExportError("the ONNX graph has a cycle or an input nothing produces")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if all(name not in available for name in n.output)]
    del graph.node[:]
    graph.node.extend(ordered)
