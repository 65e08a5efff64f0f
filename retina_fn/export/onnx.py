"""An exported program translated to ONNX (the `onnx` extra: onnx, onnxscript, onnxruntime).

    opset = to_onnx(program, "exported/demo/model.onnx")
"""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn import errors
from retina_fn.export.folder import INPUT_NAMES, OUTPUT_NAMES

INSTALL = "pip install -e '.[onnx]'"


def available() -> bool:
    """Whether onnx and onnxscript import (the ONNX exporter's dependencies)."""
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _stable_sort(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable in ONNX: TopK over the whole axis, which ONNX specifies to order equal values by their
    index (a stable sort), so the translation keeps the tie order the library relies on."""
    from onnxscript import opset18 as op  # noqa: PLC0415 - optional dependency

    size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def to_onnx(program: torch.export.ExportedProgram, path: str, input_names: Sequence[str] = INPUT_NAMES,
            output_names: Sequence[str] = OUTPUT_NAMES) -> int:
    """Translates an exported program to ONNX with torch's dynamo-based exporter and saves it at `path`.

    Args:
      program: an ExportedProgram (of an `InferenceModule`, or of any function of the library).
      path: the .onnx file to write (one file: the weights stay inside below ONNX's 2 GB limit).
      input_names, output_names: the graph's input and output names, in order.

    Returns:
      The ONNX opset of the default domain.

    Raises:
      MissingDependencyError (an ImportError): onnx or onnxscript missing.
    """
    if not available():
        raise errors.MissingDependencyError(f"ONNX export needs onnx and onnxscript: {INSTALL}")
    import onnxscript.optimizer  # noqa: PLC0415 - optional dependency

    # onnxruntime optimises the graph itself when it loads it: the exporter's own pattern rewrites tripled the
    # export time of the R50 for no speed-up; folding constants and dropping what is unused is enough.
    onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=list(input_names),
                                     output_names=list(output_names),
                                     custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
                                     optimize=False, verbose=False)
    onnxscript.optimizer.fold_constants(onnx_program.model)
    onnxscript.optimizer.remove_unused_nodes(onnx_program.model)
    onnx_program.save(path)
    return int(onnx_program.model.opset_imports[""])
