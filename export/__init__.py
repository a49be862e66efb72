"""ssmstream.export — torch → ONNX step + prefill graphs, manifest, verification.

    from ssmstream.export import export_model
    export_model("ckpt/", "model/")            # == `ssmstream export ckpt/ --out model/`

See exporter.py (pipeline, graph I/O), modules.py (the export-only torch modules and their
math) and verify.py (the parity check).
"""

from .exporter import DTYPES, ExportConfig, ExportError, ExportFailed, export_model, export_network
from .verify import TOLERANCES, verify_graphs, verify_model

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "ExportConfig",
    "ExportError",
    "ExportFailed",
    "export_model",
    "export_network",
    "verify_graphs",
    "verify_model",
]
