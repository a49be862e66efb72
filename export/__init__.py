"""ssmstream.export — torch → ONNX step + prefill graphs."""
