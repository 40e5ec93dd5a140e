"""Tensor names, signatures, the description and the converter's notes: what LiteRT shows
and TFLite Micro never reads.

A converted Keras model names every tensor after the layers and ops that made it
("digits_cnn_1/quant_conv3_1/Relu;digits_cnn_1/quant_conv3_1/add;..."), its signature def
names them again, and the converter leaves its notes: 2,456 bytes of the digits CNN's
13,120-byte LUT file. On a microcontroller that is flash spent on nothing: `strip` leaves
them out (what TensorFlow's `flatbuffer_utils.strip_strings` does; op codes stay), with the
converter's metadata (`CONVERTER_METADATA`), and checks that the result is still a valid
model.

Example:
    >>> small = strip(open("model.lut.tflite", "rb").read())
    >>> len(small)
    10664
"""
from ai_edge_litert import schema_py_generated as schema

from tflite_ext import flatbuffer_check


def rewrite(flatbuffer, edit):
    """`flatbuffer` read into the schema's object API, `edit(model)` applied, written back."""
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flatbuffer, 0))
    edit(model)
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# The converter's notes: the TFLite version it wants and how it converted. TFLM reads
# neither (it reads OFFLINE_MEMORY_ALLOCATION, kept like every other metadata entry).
CONVERTER_METADATA = (b"min_runtime_version", b"CONVERSION_METADATA")


def _drop_names(model):
    model.description = None
    model.signatureDefs = None  # they map names to tensors: nothing without the names
    for graph in model.subgraphs or []:
        graph.name = None
        for tensor in graph.tensors or []:
            tensor.name = None
    kept = [m for m in model.metadata or [] if m.name not in CONVERTER_METADATA]
    used = {m.buffer for m in kept} | {t.buffer for g in model.subgraphs or []
                                       for t in g.tensors or []}
    for entry in model.metadata or []:
        if entry.name in CONVERTER_METADATA and entry.buffer not in used:
            model.buffers[entry.buffer].data = None  # an empty buffer keeps the numbering
    model.metadata = kept or None


def strip(flatbuffer):
    """`flatbuffer` without tensor and subgraph names, signature defs, description and the
    converter's metadata.

    The operators, tensors and buffers are the same, so are the outputs. LiteRT runs it
    through `get_input_details` / `get_output_details` (not `get_signature_runner`); TFLM
    never reads names.
    """
    out = rewrite(flatbuffer, _drop_names)
    flatbuffer_check.check(out)
    return out
