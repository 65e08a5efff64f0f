"""An exported program translated to ONNX (the `onnx` extra: onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn import errors
from retina_fn.export.folder import INPUT_NAMES, OUTPUT_NAMES

INSTALL = "pip install -e '.[onnx]'"


def available() -> bool:
    """Whether onnx and onnxscript import."""
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _stable_sort(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable as TopK over the whole axis, which ONNX specifies to order ties by index (stable)."""
    from onnxscript import opset18 as op  # noqa: PLC0415 - optional dependency

    size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def to_onnx(program: torch.export.ExportedProgram, path: str, input_names: Sequence[str] = INPUT_NAMES,
            output_names: Sequence[str] = OUTPUT_NAMES) -> int:
    """Translates an exported program to ONNX (torch's dynamo exporter), saved as one file at `path`.

    Returns the default domain's ONNX opset; raises MissingDependencyError (an ImportError) without onnx/onnxscript.
    """
    if not available():
        raise errors.MissingDependencyError(f"ONNX export needs onnx and onnxscript: {INSTALL}")
    import onnxscript.optimizer  # noqa: PLC0415 - optional dependency

    # onnxruntime optimises the graph when it loads it: folding constants and dropping unused nodes is enough
    onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=list(input_names),
                                     output_names=list(output_names),
                                     custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
                                     optimize=False, verbose=False)
    onnxscript.optimizer.fold_constants(onnx_program.model)
    onnxscript.optimizer.remove_unused_nodes(onnx_program.model)
    onnx_program.save(path)
    return int(onnx_program.model.opset_imports[""])
